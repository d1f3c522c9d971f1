"""What a tensor group's own factors cost per training step, next to the step of UNETR-B's ViT blocks.

    python benchmarks/factor_cost.py              # tCURLoRA and LoRA-PT (paper grouping, r=8), 64 and 512 tokens
    python benchmarks/factor_cost.py --tokens 64 --repeats 7 --arms tcurlora_paper

Per group: ``TensorGroup.compute_factors()`` (the flattened thin factors every layer of the group re-uses within a
model forward) and the backward through them, with fixed random output gradients (the autograd node saves nothing
and recomputes the factors in its backward, so this is what one training step pays for the group, apart from the
per-layer products). Per arm and token count: one training step of the adapted blocks (grads cleared + forward of the
12 blocks + mean-square loss + backward, input ``requires_grad`` as in ``benchmarks/vit_blocks.py``), which includes
each group's factors once. Ratio = factor fwd+bwd / step. Both medians over ``--repeats`` (>= 5) runs after one
warm-up, CPU, one torch thread. The network and arms are those of ``benchmarks/vit_blocks.py`` (its
``vit_blocks_cpu`` config's model and targets, the recipes' PEFT configs).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _vit_blocks():
    try:
        from benchmarks import vit_blocks
    except ImportError:
        import vit_blocks  # type: ignore[no-redef]
    return vit_blocks


ARMS = {
    "tcurlora_paper": {"name": "tcurlora", "r": 8, "grouping": "paper", "delta_mode": "factored",
                       "label": "tCURLoRA r=8 (paper)"},
    "lorapt_paper": {"name": "lorapt", "r": 8, "grouping": "paper", "delta_mode": "factored",
                     "label": "LoRA-PT r=8 (paper)"},
    "tcurlora_by_shape": {"name": "tcurlora", "r": 8, "grouping": "by_shape", "delta_mode": "factored",
                          "label": "tCURLoRA r=8 (by shape)"},
    "lorapt_by_shape": {"name": "lorapt", "r": 8, "grouping": "by_shape", "delta_mode": "factored",
                        "label": "LoRA-PT r=8 (by shape)"},
}


def _groups(model):
    from peft_tensor.tuners.tensor_group import TensorGroup

    return [m for m in model.modules() if isinstance(m, TensorGroup)]


def factor_ms(group, repeats: int) -> float:
    """Median wall ms of ``compute_factors()`` + backward with fixed random output gradients (grads cleared)."""
    gen = torch.Generator().manual_seed(0)
    outs = [t for pair in group.compute_factors() for t in pair]
    grads = [torch.randn(t.shape, generator=gen) if t.requires_grad else None for t in outs]
    samples = []
    for i in range(repeats + 1):  # the first is a warm-up
        for p in group.parameters():
            p.grad = None
        t0 = time.perf_counter()
        outs = [t for pair in group.compute_factors() for t in pair]
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        if i:
            samples.append((time.perf_counter() - t0) * 1e3)
    return sorted(samples)[len(samples) // 2]


def step_ms(vb, model, x, repeats: int) -> float:
    """Median wall ms of one training step of the blocks (``vit_blocks._step``) after one warm-up step."""
    device = torch.device("cpu")
    samples = [vb._step(model, x, device)["wall_ms"] for _ in range(repeats + 1)][1:]
    return sorted(samples)[len(samples) // 2]


def run(arms: list[str], tokens: list[int], repeats: int, log=print) -> list[dict]:
    from peft_tensor.training.config import load_config

    vb = _vit_blocks()
    torch.set_num_threads(1)
    cfg = load_config("vit_blocks_cpu", [], search=[vb.CONFIG_DIR])
    base = vb.build_blocks(cfg["model"], seed=0)
    hidden = int(cfg["model"]["hidden_size"])
    rows = []
    for arm_name in arms:
        model, info = vb.build_arm(base, ARMS[arm_name], cfg["targets"], torch.device("cpu"))
        groups = _groups(model)
        log(f"{info['label']}: {len(groups)} groups, set-up {info['setup_s']:.1f} s")
        per_group = {g.name: (tuple(g.group_shape.tolist()), factor_ms(g, repeats)) for g in groups}
        for n in tokens:
            x = torch.randn(1, n, hidden, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
            step = step_ms(vb, model, x, repeats)
            vb._clear(model, x)
            for name, (shape, ms) in per_group.items():
                rows.append({"arm": info["label"], "group": name, "shape": shape, "tokens": n, "factor_ms": ms,
                             "step_ms": step, "ratio": ms / step})
            total = sum(ms for _, ms in per_group.values())
            rows.append({"arm": info["label"], "group": "all groups", "shape": None, "tokens": n,
                         "factor_ms": total, "step_ms": step, "ratio": total / step})
            log(f"  {n} tokens: step {step:.1f} ms, factors of all groups {total:.1f} ms ({100 * total / step:.1f}%)")
        del model
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| arm | group (L x n1 x n2) | tokens | factor fwd+bwd ms | step ms | ratio |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        group = r["group"] + (f" ({' x '.join(map(str, r['shape']))})" if r["shape"] else "")
        lines.append(f"| {r['arm']} | {group} | {r['tokens']} | {r['factor_ms']:.2f} | {r['step_ms']:.1f} | "
                     f"{r['ratio']:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arms", nargs="+", default=["tcurlora_paper", "lorapt_paper"], choices=sorted(ARMS))
    parser.add_argument("--tokens", nargs="+", type=int, default=[64, 512])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be at least 5 (medians of fewer runs are noise on a shared machine)")
    load0 = os.getloadavg()
    rows = run(args.arms, args.tokens, args.repeats, log=lambda m: print(m, flush=True, file=sys.stderr))
    print(f"CPU, 1 torch thread, median of {args.repeats} runs after 1 warm-up; torch {torch.__version__}; "
          f"load average {tuple(round(v, 2) for v in load0)} -> {tuple(round(v, 2) for v in os.getloadavg())}\n")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
