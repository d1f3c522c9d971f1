"""Matmul work of each way to apply the tensor adapters to UNETR-B's 12 ViT blocks, against a measured run of
``vit_blocks.py``: how close to LoRA's step any *exact* scheme can get on that machine (issue 14).

    python benchmarks/flop_bound.py                                   # results/vit_blocks_cpu.json, first cell
    python benchmarks/flop_bound.py --results benchmarks/results/vit_blocks_cpu_1024x2.json

Multiply-adds per step (forward + backward, input gradients as in the benchmark), counted per layer from the shapes:
a layer with input width ``n2``, ``s`` output slices of width ``n1`` (the fused qkv: ``s = 3``), a group of ``L``
slices and rank ``q`` per term (``L q`` is the rank of each slice's update):

* floor: every Linear forward and its input gradient, plus attention's ``QK^T`` / ``AV`` and their gradients;
* LoRA r: ``3 r (n_in + n_out)`` per layer (forward, input gradient, the two weight gradients);
* ``factored`` (what runs by default): ``h = x B^T`` once per layer (``n2 L q``), ``D_k x = A h_rolled`` per slice
  (``n1 L q``), the same products transposed for the input gradient, and the weight gradient of each trainable
  factor (tCURLoRA: ``B = (U - U0) * R`` only; LoRA-PT: ``U`` and ``S V^T``, plus a frozen second term unless
  ``frozen_term='dense'``);
* ``dense``: ``x (W + D_k)^T`` costs the frozen product; what it adds is the weight-sized gradient ``g^T x``
  (``s n1 n2``) per layer (the FFTs that build ``D`` and the weight-sized additions are memory traffic, not counted);
* ``hybrid`` (a lower bound): the forward and the input gradient through a dense ``W + D_k`` (free) and only the
  cheapest weight gradient (``g A`` per slice and ``x``'s side once per layer, or the dense one if smaller), with
  the materialisation of ``W + D_k`` counted as free.

Seconds: the floor arm's measured CPU time over its multiply-adds gives the rate the machine reaches on these
matmuls; each scheme's time is the floor's plus its adapter work at that rate, which ignores every non-matmul cost,
so it is a lower bound for that scheme. ``x LoRA`` divides by LoRA's *measured* time (its non-matmul overhead
included, which only favours LoRA's competitors here).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

# UNETR-B's ViT: hidden n, MLP m, 12 blocks; paper grouping: attention (out_proj, q, k, v of every block: L = 48),
# MLP up (L = 12), MLP down (L = 12)
N_HIDDEN, N_MLP, BLOCKS, RANK = 768, 3072, 12, 8
UNETR_B = (N_HIDDEN, N_MLP, BLOCKS)
GROUP_OF = [0, 0, 1, 2]  # the layers' groups: attention, MLP up, MLP down


def layers(dims=UNETR_B) -> list[tuple[int, int, int, int]]:
    """Per block, ``(group L, input width n2, slices s, slice output width n1)`` of each adapted Linear."""
    n, m, blocks = dims
    return [(4 * blocks, n, 3, n),  # attn.qkv: q, k, v slices
            (4 * blocks, n, 1, n),  # attn.out_proj
            (blocks, n, 1, m),      # mlp.linear1
            (blocks, m, 1, n)]      # mlp.linear2


def groups(dims=UNETR_B) -> list[tuple[int, int, int]]:
    """``(L, n1, n2)`` of the attention, MLP-up and MLP-down group tensors."""
    n, m, blocks = dims
    return [(4 * blocks, n, n), (blocks, m, n), (blocks, n, m)]


def floor_macs(tokens: int, dims=UNETR_B) -> int:
    """Per token per block: the Linears forward + input gradient, attention forward (2 T n) + backward (4 T n)."""
    linears = sum(n2 * s * n1 for _, n2, s, n1 in layers(dims))
    return 2 * linears + 6 * tokens * dims[0]


def lora_macs(r: int = RANK, dims=UNETR_B) -> int:
    return sum(3 * r * (n2 + s * n1) for _, n2, s, n1 in layers(dims))


def adapter_macs(method: str, scheme: str, r: int = RANK, group: int | None = None, dims=UNETR_B) -> int:
    """Per token per block, summed over the adapted layers (of one group if ``group`` is given; see the module
    docstring)."""
    total = 0
    for (n_slices, n2, s, n1), g in zip(layers(dims), GROUP_OF):
        if group is not None and g != group:
            continue
        lq = n_slices * r
        apply = n2 * lq + s * n1 * lq  # one factored term, forward (the input gradient costs the same again)
        grad_b = n2 * lq  # weight gradient of B (x's side, once per layer), after g A per slice (in the backward)
        grad_a = s * n1 * lq  # weight gradient of A (h^T g per slice)
        dense_grad = s * n1 * n2
        if scheme == "factored":
            if method == "tcurlora":
                total += 2 * apply + grad_b
            elif method == "lorapt":  # trainable U * (S V^T) and the frozen U0 * -(S0 V0^T)
                total += 2 * apply + grad_a + grad_b + 2 * apply
            elif method == "lorapt_frozen_dense":  # W - P0 held: the trainable term only
                total += 2 * apply + grad_a + grad_b
        elif scheme == "dense":
            total += dense_grad
        elif scheme == "hybrid":
            factored_grad = s * n1 * lq + grad_b if method == "tcurlora" else grad_a + s * n1 * lq + 2 * grad_b
            total += min(dense_grad, factored_grad)
    return total


SCHEMES = [("tcurlora", "factored"), ("tcurlora", "dense"), ("tcurlora", "hybrid"),
           ("lorapt", "factored"), ("lorapt_frozen_dense", "factored"), ("lorapt", "dense"), ("lorapt", "hybrid")]
LABELS = {"tcurlora": "tCURLoRA", "lorapt": "LoRA-PT", "lorapt_frozen_dense": "LoRA-PT, frozen_term=dense"}
MEASURED = {("tcurlora", "factored"): "tcurlora_paper", ("tcurlora", "dense"): "tcurlora_paper_dense",
            ("lorapt", "factored"): "lorapt_paper", ("lorapt_frozen_dense", "factored"): "lorapt_paper_p0",
            ("lorapt", "dense"): "lorapt_paper_dense"}


def build_seconds(reps: int = 3) -> list[float]:
    """Per group, measured CPU seconds (median of ``reps``, one thread) of what a dense ``W + D_k`` costs per step
    besides matmuls: the group's ``D`` built through the FFT from one rank-``RANK`` term
    (:func:`peft_tensor.tuners._dense_linear.dense_from_factors`; LoRA-PT's frozen term folded into a held
    ``W - P0``) and the weight-sized sum ``W + D_k`` of each of its Linears, formed twice (forward and input
    gradient)."""
    import time

    import torch

    from peft_tensor.tuners._dense_linear import dense_from_factors

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    out = []
    for g, (n_slices, n1, n2) in enumerate(groups()):
        weights = [torch.randn(s * m1, m2, generator=gen) for (_, m2, s, m1), gi in zip(layers(), GROUP_OF)
                   if gi == g]
        pair = [(torch.randn(n_slices, n1, RANK, generator=gen), torch.randn(n_slices, RANK, n2, generator=gen))]
        times = []
        for _ in range(reps):
            t0 = time.process_time()
            d = dense_from_factors(pair)
            del d
            for w in weights:
                for _ in range(2 * BLOCKS):
                    _ = w + w
            times.append(time.process_time() - t0)
        out.append(sorted(times)[len(times) // 2])
    return out


def report(results: dict, cell: int = 0, build: bool = True) -> str:
    c = results["cells"][cell]
    tokens, batch = c["tokens"], c["batch"]
    per_step = tokens * batch * BLOCKS
    arms = c["arms"]
    floor_s, lora_s = arms["floor"]["cpu_ms"] / 1e3, arms["lora"]["cpu_ms"] / 1e3
    rate = floor_macs(tokens) * per_step / floor_s  # multiply-adds per CPU second on the floor's matmuls
    lines = [f"# Matmul work of the exact schemes, UNETR-B's 12 ViT blocks, {tokens} tokens x {batch}, r={RANK}",
             "",
             f"Measured ({results.get('started', '?')}, commit {results.get('versions', {}).get('git_commit', '?')}):"
             f" floor {floor_s:.2f} s, PEFT LoRA {lora_s:.2f} s of CPU time per step; floor work "
             f"{floor_macs(tokens) * per_step / 1e9:.1f} GMAC -> {rate / 1e9:.1f} GMAC per CPU second. LoRA's own "
             f"matmul work is {lora_macs() * per_step / 1e9:.2f} GMAC ({lora_macs() * per_step / rate:.2f} s at that "
             f"rate); it measured {lora_s - floor_s:.2f} s above the floor.",
             "",
             "| method | scheme | adapter GMAC / step | floor + adapter at the floor's rate, s | x LoRA (bound) "
             "| measured x LoRA |",
             "|---|---|---:|---:|---:|---:|"]
    for method, scheme in SCHEMES:
        work = adapter_macs(method, scheme) * per_step
        bound = floor_s + work / rate
        measured = arms.get(MEASURED.get((method, scheme), ""), {}).get("cpu_ms")
        lines.append(f"| {LABELS[method]} | {scheme} | {work / 1e9:.1f} | {bound:.2f} | {bound / lora_s:.2f} | "
                     + (f"{measured / 1e3 / lora_s:.2f} |" if measured else "not run |"))
    if build:
        extra = build_seconds()
        lines.append("")
        lines.append("Per group, the cheaper of factored and hybrid, the hybrid paying its measured D build and "
                     "W + D_k "
                     f"sums (attention / MLP up / MLP down: {' / '.join(f'{t:.2f}' for t in extra)} s):")
        lines.append("")
        lines.append("| method | per group | floor + adapter, s | x LoRA (bound) |")
        lines.append("|---|---|---:|---:|")
        for method in ("tcurlora", "lorapt_frozen_dense"):
            total, picks = floor_s, []
            hybrid_method = "tcurlora" if method == "tcurlora" else "lorapt"
            for g in range(len(groups())):
                fact = adapter_macs(method, "factored", group=g) * per_step / rate
                hyb = adapter_macs(hybrid_method, "hybrid", group=g) * per_step / rate + extra[g]
                total += min(fact, hyb)
                picks.append("hybrid" if hyb < fact else "factored")
            lines.append(f"| {LABELS[method]} | {' / '.join(picks)} | {total:.2f} | {total / lora_s:.2f} |")
    lines += ["", "x LoRA (bound): the scheme's matmul work only, at the rate the floor reached, over LoRA's measured "
              "time; every non-matmul cost (the FFTs and weight-sized additions of a dense W + D_k, index gathers, "
              "kernel overheads) comes on top. `hybrid` is the cheapest exact scheme we know: it takes the forward "
              "and input gradient through W + D_k for free and pays only the smallest weight gradient."]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(HERE / "results" / "vit_blocks_cpu.json"))
    ap.add_argument("--cell", type=int, default=0, help="index of the (tokens, batch) cell in the results")
    ap.add_argument("--no-build", action="store_true", help="skip timing the D build of the hybrid scheme")
    ap.add_argument("--out", default=None, help="also write the table to this .md file")
    args = ap.parse_args(argv)
    text = report(json.loads(Path(args.results).read_text()), args.cell, build=not args.no_build)
    print(text)
    if args.out:
        from peft_tensor._atomic import atomic_write_text

        atomic_write_text(Path(args.out), text + "\n")


if __name__ == "__main__":
    main()
