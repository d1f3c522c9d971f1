"""Adapter-only learning-rate sweep (issue 13): which learning rate makes each method's factors learn.

Every run fine-tunes the demo's cached backbone on the embedded target task (the demo config: 5 training subjects,
8 held-out subjects x 2 hemispheres) with the decoder frozen and only the 1x1x1 head trained beside the adapter
(arm option ``decoder: head``): the head at the recipe's ``optim.lr`` (3e-3), the adapter's factors at the swept
``method_lr``. ``frozen`` (head only) is the reference. PEFT's LoRA (r=8) and PiSSA (the recipes' r=2) are swept
the same way, so that every arm of a comparison runs at its own swept rate: the registry's ``lr`` of each method and
:data:`peft_tensor.registry.BASELINE_LR` of LoRA and PiSSA come from this sweep. Results: one JSON line per run in
``<output_dir>/<stem>.jsonl`` (appended, so an interrupted sweep keeps its runs) and a markdown table ``<stem>.md``
(lr x method -> test Dice, with the rate the recipes use today and the command).

    python benchmarks/lr_sweep.py finetune.train.steps=60 progress=false      # the grid below (~35 runs)
    python benchmarks/lr_sweep.py grid='{"tcurlora": [0.3], "lora": [3e-3]}'   # the demo's 120 steps
    python benchmarks/lr_sweep.py progress=false threads=1 stem=lr_sweep_baselines_cpu \
        'grid={"lora": [0.003, 0.01, 0.03, 0.1], "pissa": [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0], "frozen": [null],
               "tcurlora": [0.3], "lorapt": [0.3], "hyps": [0.1]}'             # the baselines' rates
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python benchmarks/<script>.py): the checkout's root, for _common
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import monai
import peft
import torch

from benchmarks._common import load_average, machine_line
from peft_tensor.recipes.demo import ensure_backbone, finetune_arm
from peft_tensor.training.config import parse_recipe_args

DEFAULT_GRID = {
    "frozen": [None],
    "lora": [3e-3, 1e-2, 3e-2, 1e-1],
    "pissa": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0],
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


def recipe_lr(method: str) -> str:
    """The rate the recipes train ``method``'s adapter alone at today (registry), for the table."""
    from peft_tensor.training.arms import optimizer_settings

    lr = optimizer_settings({"name": method, "decoder": "head"}).get("method_lr")  # the adapter-alone rate
    return "—" if lr is None else f"{lr:g}"


def markdown(rows: list[dict], footer: str = "") -> str:
    """lr x method -> test Dice, with the rate each method's adapter trains at in the recipes (``recipe lr``, the
    registry's), the best cell of each method in bold; ``footer`` (the command, the machine) goes under it."""
    lrs = sorted({r["lr"] for r in rows if r["lr"] is not None})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    steps = sorted({r["steps"] for r in rows})
    lines = [f"Adapter-only test Dice (decoder frozen, head at 3e-3), steps {steps}; mean over the held-out cases; "
             "columns: the adapter's swept rate; recipe lr: the rate the recipes give the adapter (the registry's)",
             "", "| method | trainable | recipe lr | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
             "|---|---:|---:|" + "---:|" * len(lrs)]
    for m in methods:
        sel = [r for r in rows if r["method"] == m]
        last = {lr: [r for r in sel if r["lr"] == lr][-1] for lr in lrs if any(r["lr"] == lr for r in sel)}
        best = max(last, key=lambda lr: last[lr]["dice"]) if last else None
        cells = [(f"**{last[lr]['dice']:.3f}**" if lr == best and len(last) > 1 else f"{last[lr]['dice']:.3f}")
                 if lr in last else "" for lr in lrs]
        if all(r["lr"] is None for r in sel):
            cells = [f"{sel[-1]['dice']:.3f} (head only)"] + [""] * (len(lrs) - 1)
        lines.append(f"| {m} | {sel[-1]['trainable']:,} | {recipe_lr(m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" + (f"\n{footer.strip()}\n" if footer.strip() else "")


def main(cfg: dict, command: str | None = None) -> Path:
    """Run the grid; every row records the adapter's swept rate (``lr``), the rate of the rest (``rest_lr``) and
    the torch threads (``threads: auto`` is resolved once, here, for every run of the sweep). The markdown ends with
    ``command`` (the command line that ran it) and the machine."""
    from peft_tensor.training.loop import configure_threads

    grid = cfg.get("grid") or DEFAULT_GRID
    if isinstance(grid, str):
        grid = json.loads(grid)
    out = Path(cfg.get("output_dir", "benchmarks/results"))
    stem = cfg.get("stem", "lr_sweep_cpu")
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / f"{stem}.jsonl"
    threads = configure_threads(cfg.get("threads"))
    cfg = {**cfg, "threads": threads}
    load_start = load_average()
    pre_dir, _, _ = ensure_backbone(cfg)
    work = Path(cfg.get("work_dir") or out / f"{stem}_runs")
    for method, lrs in grid.items():
        for lr in lrs:
            arm = arm_for(method, lr)
            t0 = time.time()
            res = finetune_arm(cfg, arm, pre_dir / "backbone", work / f"{method}_{lr}")
            row = {"method": method, "lr": lr, "rest_lr": (res.get("rates") or {}).get("lr"), "steps": res["steps"],
                   "trainable": res["params"]["trainable"], "dice": res["test"]["dice"]["mean"],
                   "dice_case_std": res["test"]["dice"]["std"], "n_test_cases": res["test"]["dice"]["n"],
                   "wall_s": round(time.time() - t0, 1), "threads": threads, "arm": arm}
            print(json.dumps(row), flush=True)
            with open(jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    footer = (f"Command: `{command}`\n\n" if command else "") + (
        f"Machine: {machine_line()}, {threads} torch thread(s), load average at start {load_start}; torch "
        f"{torch.__version__}, peft {peft.__version__}, monai {monai.__version__}. One seed ({cfg['seed']}): "
        "differences under about 0.03 are within run-to-run noise.")
    (out / f"{stem}.md").write_text(markdown(rows, footer))
    return out / f"{stem}.md"


if __name__ == "__main__":
    config = parse_recipe_args(description=__doc__, default_config="demo", schema="lr_sweep")
    config.setdefault("progress", False)
    print(main(config, "python benchmarks/lr_sweep.py " + shlex.join(sys.argv[1:])).read_text())
