"""Adapter-only learning-rate sweep (issue 13): which learning rate makes each method's factors learn.

Every run fine-tunes the demo's cached backbone on the embedded target task (the demo config: 5 training subjects,
8 held-out subjects x 2 hemispheres) with the decoder frozen and only the 1x1x1 head trained beside the adapter
(arm option ``decoder: head``): the head at the recipe's ``optim.lr`` (3e-3), the adapter's factors at the swept
``method_lr``. ``frozen`` (head only) and PEFT LoRA r=8 are the references. Results: one JSON line per run in
``<output_dir>/<stem>.jsonl`` (appended, so an interrupted sweep keeps its runs) and a markdown table
``<stem>.md`` (lr x method -> test Dice).

    python benchmarks/lr_sweep.py finetune.train.steps=60 progress=false      # the grid below (~25 runs)
    python benchmarks/lr_sweep.py grid='{"tcurlora": [0.3], "lora": [3e-3]}'   # the demo's 120 steps
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from peft_tensor.recipes.demo import ensure_backbone, finetune_arm
from peft_tensor.training.config import parse_recipe_args

DEFAULT_GRID = {
    "frozen": [None],
    "lora": [3e-3, 1e-2, 3e-2],
    "tcurlora": [3e-3, 3e-2, 1e-1, 3e-1, 1.0],
    "lorapt": [3e-4, 3e-3, 3e-2, 1e-1, 3e-1, 1.0],
    "hyps": [3e-3, 1e-2, 3e-2, 1e-1],
}


def arm_for(method: str, lr, extra: dict | None = None) -> dict:
    arm = {"name": method, "decoder": "head", **(extra or {})}
    if method in ("tcurlora", "lorapt", "lora"):
        arm.setdefault("r", 8)
    if lr is not None:
        arm["method_lr"] = float(lr)
    return arm


def markdown(rows: list[dict]) -> str:
    lrs = sorted({r["lr"] for r in rows if r["lr"] is not None})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    steps = sorted({r["steps"] for r in rows})
    lines = [f"Adapter-only test Dice (decoder frozen, head at 3e-3), steps {steps}; mean over the held-out cases",
             "", "| method | trainable | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
             "|---|---:|" + "---:|" * len(lrs)]
    for m in methods:
        sel = [r for r in rows if r["method"] == m]
        cells = []
        for lr in lrs:
            hit = [r for r in sel if r["lr"] == lr]
            cells.append(f"{hit[-1]['dice']:.3f}" if hit else "")
        if all(r["lr"] is None for r in sel):
            cells = [f"{sel[-1]['dice']:.3f} (head only)"] + [""] * (len(lrs) - 1)
        lines.append(f"| {m} | {sel[-1]['trainable']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(cfg: dict) -> Path:
    grid = cfg.get("grid") or DEFAULT_GRID
    if isinstance(grid, str):
        grid = json.loads(grid)
    out = Path(cfg.get("output_dir", "benchmarks/results"))
    stem = cfg.get("stem", "lr_sweep_cpu")
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / f"{stem}.jsonl"
    pre_dir, _, _ = ensure_backbone(cfg)
    work = Path(cfg.get("work_dir") or out / f"{stem}_runs")
    for method, lrs in grid.items():
        for lr in lrs:
            arm = arm_for(method, lr)
            t0 = time.time()
            res = finetune_arm(cfg, arm, pre_dir / "backbone", work / f"{method}_{lr}")
            row = {"method": method, "lr": lr, "steps": res["steps"], "trainable": res["params"]["trainable"],
                   "dice": res["test"]["dice"]["mean"], "dice_case_std": res["test"]["dice"]["std"],
                   "n_test_cases": res["test"]["dice"]["n"], "wall_s": round(time.time() - t0, 1), "arm": arm}
            print(json.dumps(row), flush=True)
            with open(jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    (out / f"{stem}.md").write_text(markdown(rows))
    return out / f"{stem}.md"


if __name__ == "__main__":
    config = parse_recipe_args(description=__doc__, default_config="demo", schema="lr_sweep")
    config.setdefault("progress", False)
    print(main(config).read_text())
