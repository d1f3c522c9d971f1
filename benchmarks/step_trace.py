"""Per-step trace of one learning-panel run (issue 22): does the adapter's optimiser stall?

Runs one cell of the learning panel (``benchmarks/learning_panel.py``: a backbone, a task, an arm, a fine-tuning
seed) through the recipe, unchanged, and records at every optimiser step, for the adapter's parameter group (the
factors the arm's ``method_lr`` trains; the head is the other group):

* ``|g|``: the gradient norm of the group, and ``|g|/med``: its ratio to the median of the earlier steps' norms
  (a spike is a step far above 1);
* ``step``: how far Adam moved the group, relative to a step that moves every entry by the learning rate,
  ``|dp| / (lr_t sqrt(n))``. Adam's first step is 1 (every entry moves by ``lr``); a run whose step stays far below
  the others' has a denominator inflated by earlier gradients (AMSGrad keeps the largest second moment it has seen,
  and with beta2 = 0.999 the plain average remembers ~1,000 steps), so it barely moves whatever its gradient.

It prints the first steps one by one, then every ``every``-th, and a summary: the largest spike (its step and
ratio), the median ``step`` over the last half of the run, and the run's test Dice and validation curve. Torch's
global optimiser hooks observe the recipe's own optimiser; nothing in the run changes.

    python benchmarks/step_trace.py backbone=pretrain_cpu task=target_shift arm='{name: lorapt, decoder: head}' seed=1
    python benchmarks/step_trace.py backbone=demo task=target_shift arm='{name: tcurlora, decoder: head}' seeds=[0,1]

``backbone`` names one of the panel config's backbones (``demo``, ``pretrain_cpu``, ``pretrain_cpu_seed1``; cached,
pretrained on first use); ``seeds=[...]`` traces several runs and prints one summary line each; any other
``key=value`` overrides the panel config (``steps=60``).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the checkout's root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import learning_panel as lp  # noqa: E402


class StepTrace:
    """Global optimiser hooks that record the adapter group's gradient norm and Adam's relative step per step.

    The adapter group is the one trained at ``method_lr`` (``make_optimizer`` puts the decoder and head, at
    ``optim.lr``, in the other); with a single group (no ``method_lr``) that group."""

    def __init__(self, method_lr: float | None):
        self.method_lr = method_lr
        self.rows: list[dict] = []
        self._before: list[torch.Tensor] | None = None
        self._handles = []

    def _group(self, optimizer):
        groups = optimizer.param_groups
        if len(groups) == 1 or self.method_lr is None:
            return groups[-1]
        # make_optimizer's order is [decoder and head, adapter]: on a tie (method_lr == optim.lr) the adapter's
        return min(reversed(groups), key=lambda g: abs(g.get("initial_lr", g["lr"]) - float(self.method_lr)))

    def _pre(self, optimizer, args, kwargs):
        group = self._group(optimizer)
        grads = [p.grad for p in group["params"] if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
        earlier = [r["grad"] for r in self.rows]
        self.rows.append({"grad": norm, "spike": norm / statistics.median(earlier) if earlier else 1.0,
                          "lr": float(group["lr"])})
        self._before = [p.detach().clone() for p in group["params"]]

    def _post(self, optimizer, args, kwargs):
        group = self._group(optimizer)
        moved = sum(float((p.detach() - b).float().pow(2).sum()) for p, b in zip(group["params"], self._before))
        n = sum(p.numel() for p in group["params"])
        row = self.rows[-1]
        row["step"] = moved ** 0.5 / (row["lr"] * n ** 0.5) if row["lr"] > 0 else float("nan")
        self._before = None

    def __enter__(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self._handles = [register_optimizer_step_pre_hook(self._pre), register_optimizer_step_post_hook(self._post)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        return False

    def summary(self) -> dict:
        rows = self.rows
        k = max(range(len(rows)), key=lambda i: rows[i]["spike"])
        late = [r["step"] for r in rows[len(rows) // 2:]]
        return {"steps": len(rows), "max_spike": rows[k]["spike"], "max_spike_step": k + 1,
                "late_step": statistics.median(late), "first_step": rows[0]["step"]}


def trace_run(cfg: dict, backbone_name: str, task: str, arm: dict, seed: int, work: Path) -> tuple[dict, StepTrace]:
    backbone = lp.ensure_backbone(cfg, backbone_name, cfg["backbones"][backbone_name])
    from peft_tensor.training.arms import arm_rates

    method_lr = arm_rates(arm).get("method_lr")
    with StepTrace(method_lr) as tr:
        row = lp.run_cell(cfg, backbone, task, "trace", arm, work, seed)
    return row, tr


def main(argv: list[str]) -> None:
    from peft_tensor._safe_yaml import load_yaml

    opts = {"backbone": "pretrain_cpu", "task": "target", "arm": "{name: lorapt, decoder: head}", "every": "10"}
    rest = []
    for a in argv:
        key = a.split("=", 1)[0]
        if key in ("backbone", "task", "arm", "every", "seed", "seeds"):
            opts[key] = a.split("=", 1)[1]
        else:
            rest.append(a)
    cfg = lp.load_panel_config(overrides=rest)
    arm = load_yaml(opts["arm"])
    if not isinstance(arm, dict) or "name" not in arm:
        raise SystemExit(f"arm={opts['arm']!r}: give an arm mapping, e.g. arm='{{name: lorapt, decoder: head}}'")
    if opts["backbone"] not in cfg["backbones"]:
        raise SystemExit(f"backbone={opts['backbone']!r}: not a panel backbone (one of {sorted(cfg['backbones'])})")
    seeds = load_yaml(opts["seeds"]) if "seeds" in opts else [int(opts.get("seed", cfg["seed"]))]
    every = max(1, int(opts["every"]))
    print(f"# step trace: backbone {opts['backbone']}, task {opts['task']}, arm {json.dumps(arm)}, "
          f"{cfg['steps']} steps")
    with tempfile.TemporaryDirectory(prefix="step-trace-") as tmp:
        lines = []
        for seed in seeds:
            row, tr = trace_run(cfg, opts["backbone"], opts["task"], arm, int(seed), Path(tmp))
            s = tr.summary()
            if len(seeds) == 1:
                print("| step | lr | adapter gradient norm | its ratio to the median of earlier steps | "
                      "Adam step / lr sqrt(n) |")
                print("|---:|---:|---:|---:|---:|")
                for i, r in enumerate(tr.rows):
                    if i < 12 or (i + 1) % every == 0:
                        print(f"| {i + 1} | {r['lr']:.3g} | {r['grad']:.2e} | {r['spike']:.1f} | {r['step']:.3f} |")
            curve = " ".join(f"{d:.2f}" for _, d in row["curve"])
            lines.append(f"| {seed} | {row['dice']:.3f} | {s['max_spike']:.0f}x at step {s['max_spike_step']} | "
                         f"{s['first_step']:.2f} | {s['late_step']:.3f} | {curve} |")
        print()
        print("| seed | test Dice | largest gradient spike (x median of earlier steps) | Adam step, step 1 | "
              "median Adam step, 2nd half | "
              "validation Dice curve |")
        print("|---:|---:|---|---:|---:|---|")
        print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
