"""Matmul work of each way to apply the tensor adapters to UNETR-B's 12 ViT blocks, against a measured run of
``vit_blocks.py``: how close to LoRA's step each *exact* scheme can get on this machine (issue 14).

    python benchmarks/flop_bound.py                                   # results/vit_blocks_cpu.json, first cell
    python benchmarks/flop_bound.py --results benchmarks/results/vit_blocks_cpu_1024x2.json
    python benchmarks/flop_bound.py --work --ranks 8,16,32 --tokens 64   # counts only: by grouping and rank

Each scheme is listed as the matmuls it adds to the frozen blocks per step (forward + backward), by shape, for a
layer with input width ``n2``, ``s`` output slices of width ``n1`` (the fused qkv: ``s = 3``) in a group of ``L``
slices with rank ``q`` per term (``L q`` is the rank of each slice's update):

* ``factored`` (what runs by default): ``h = x B^T`` once per layer (``T x n2 x Lq``), ``D_k x = A h_rolled`` per
  slice (``Ts x Lq x n1``), the same products transposed for the input gradient, and the weight gradient of each
  trainable factor (tCURLoRA: ``B = (U - U0) * R`` only; LoRA-PT: ``U`` and ``S V^T``, plus a frozen second term
  unless ``frozen_term='dense'``);
* ``dense``: ``x (W + D_k)^T`` costs the frozen product; it adds the weight-sized gradient ``g^T x`` per layer;
* ``hybrid`` (not implemented; the cheapest exact scheme we know): the forward and the input gradient through a
  dense ``W + D_k`` (free) and only the cheaper weight gradient (``g A`` per slice and ``x``'s side once per layer,
  or the dense one).

Seconds: each scheme's matmuls are timed here with ``torch.mm`` at their shapes (one thread, median of 3), and
added to the *measured* floor of the results file. This ignores every non-matmul cost (index gathers, additions,
kernel overheads; for ``dense`` / ``hybrid`` the FFT that builds ``D`` and the weight-sized sums ``W + D_k``): it is
what an implementation of that scheme with no other cost would reach on this machine (a bound up to timing noise:
the matmuls are timed in isolation, not inside the step); ``x LoRA`` divides by LoRA's *measured* time, its non-matmul
overhead included. The last table adds the measured cost of building ``D`` and the sums to the hybrid, group by
group, and takes the cheaper scheme per group. :func:`adapter_macs` (the multiply-adds of the same shapes) is checked
against what the package executes in ``tests/benchmarks/test_flop_bound.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python benchmarks/<script>.py): the checkout's root, for _common
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS_DIR, middle

# UNETR-B's ViT: hidden n, MLP m, 12 blocks; paper grouping: attention (out_proj, q, k, v of every block: L = 48),
# MLP up (L = 12), MLP down (L = 12)
N_HIDDEN, N_MLP, BLOCKS, RANK = 768, 3072, 12, 8
UNETR_B = (N_HIDDEN, N_MLP, BLOCKS)
GROUP_OF = [0, 0, 1, 2]  # the layers' groups: attention, MLP up, MLP down


def layers(dims=UNETR_B, grouping: str = "paper") -> list[tuple[int, int, int, int]]:
    """Per block, ``(group L, input width n2, slices s, slice output width n1)`` of each adapted Linear.
    ``grouping="by_shape"``: each Linear's weights over the blocks form a group of their own, the fused qkv one
    ``3n``-row slice per block (``TCURLoraConfig.grouping``)."""
    n, m, blocks = dims
    if grouping == "by_shape":
        return [(blocks, n, 1, 3 * n), (blocks, n, 1, n), (blocks, n, 1, m), (blocks, m, 1, n)]
    if grouping != "paper":
        raise ValueError(f"grouping must be 'paper' or 'by_shape', got {grouping!r}")
    return [(4 * blocks, n, 3, n),  # attn.qkv: q, k, v slices
            (4 * blocks, n, 1, n),  # attn.out_proj
            (blocks, n, 1, m),      # mlp.linear1
            (blocks, m, 1, n)]      # mlp.linear2


def group_of(grouping: str = "paper") -> list[int]:
    """The group of each of :func:`layers`' Linears."""
    return GROUP_OF if grouping == "paper" else [0, 1, 2, 3]


def groups(dims=UNETR_B) -> list[tuple[int, int, int]]:
    """``(L, n1, n2)`` of the attention, MLP-up and MLP-down group tensors (paper grouping)."""
    n, m, blocks = dims
    return [(4 * blocks, n, n), (blocks, m, n), (blocks, n, m)]


def floor_macs(tokens: int, dims=UNETR_B) -> int:
    """Per token per block: the Linears forward + input gradient, attention forward (2 T n) + backward (4 T n)."""
    linears = sum(n2 * s * n1 for _, n2, s, n1 in layers(dims))
    return 2 * linears + 6 * tokens * dims[0]


def adapter_matmuls(method: str, scheme: str, tokens: int, r: int = RANK, group: int | None = None,
                    dims=UNETR_B, grouping: str = "paper") -> list[tuple[int, int, int]]:
    """The ``(m, k, n)`` matmuls (``(m x k) @ (k x n)``) a scheme adds to one block's forward + backward on
    ``tokens`` tokens (of one group's layers if ``group`` is given; see the module docstring)."""
    t = tokens
    out = []
    for (n_slices, n2, s, n1), g in zip(layers(dims, grouping), group_of(grouping)):
        if group is not None and g != group:
            continue
        lq = n_slices * r
        apply = [(t, n2, lq), (t * s, lq, n1)]  # h = x B^T; D_k x = h_rolled A per slice
        back = [(t * s, n1, lq), (t, lq, n2)]  # the input gradient through the same term
        grad_b = [(lq, t, n2)]  # dB = (g A)^T x, after g A (in ``back``)
        grad_a = [(lq, t * s, n1)]  # dA = h_rolled^T g
        dense_grad = [(s * n1, t, n2)]  # dW = g^T x
        if scheme == "factored":
            if method == "tcurlora":
                out += apply + back + grad_b
            elif method == "lorapt":  # trainable U * (S V^T) and the frozen U0 * -(S0 V0^T)
                out += apply + back + grad_a + grad_b + apply + back
            elif method == "lorapt_frozen_dense":  # W - P0 held: the trainable term only
                out += apply + back + grad_a + grad_b
            else:
                raise ValueError(method)
        elif scheme == "dense":
            out += dense_grad
        elif scheme == "hybrid":
            thin = [(t * s, n1, lq)] + grad_b  # g A per slice, then (g A)^T x
            if method != "tcurlora":  # both factors train: h = x B^T and h_rolled^T g too
                thin += [(t, n2, lq)] + grad_a
            out += min(dense_grad, thin, key=lambda mm: sum(a * b * c for a, b, c in mm))
        else:
            raise ValueError(scheme)
    return out


def adapter_macs(method: str, scheme: str, r: int = RANK, group: int | None = None, dims=UNETR_B,
                 tokens: int = 64, grouping: str = "paper") -> float:
    """Multiply-adds per token per block of :func:`adapter_matmuls` (linear in the token count)."""
    return sum(m * k * n for m, k, n in adapter_matmuls(method, scheme, tokens, r, group, dims, grouping)) / tokens


_MM_SECONDS: dict = {}


def matmul_seconds(shapes, reps: int = 3) -> float:
    """CPU seconds of ``torch.mm`` at each shape (median of ``reps`` per distinct shape, one thread), summed."""
    import time

    import torch

    torch.set_num_threads(1)
    total = 0.0
    for shape in shapes:
        if shape not in _MM_SECONDS:
            m, k, n = shape
            a, b = torch.randn(m, k), torch.randn(k, n)
            torch.mm(a, b)
            times = []
            for _ in range(reps):
                t0 = time.process_time()
                torch.mm(a, b)
                times.append(time.process_time() - t0)
            _MM_SECONDS[shape] = middle(times)
        total += _MM_SECONDS[shape]
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
        out.append(middle(times))
    return out


def report(results: dict, cell: int = 0, build: bool = True) -> str:
    c = results["cells"][cell]
    tokens, batch = c["tokens"], c["batch"]
    t = tokens * batch
    arms = c["arms"]
    floor_s, lora_s = arms["floor"]["cpu_ms"] / 1e3, arms["lora"]["cpu_ms"] / 1e3
    lora_mm = [mm for _, n2, s, n1 in layers() for mm in
               [(t, n2, RANK), (t, RANK, s * n1), (t, s * n1, RANK), (t, RANK, n2), (RANK, t, n2), (s * n1, t, RANK)]]

    def seconds(method, scheme, group=None):
        return BLOCKS * matmul_seconds(adapter_matmuls(method, scheme, t, group=group))

    lines = [f"# Matmul work of the exact schemes, UNETR-B's 12 ViT blocks, {tokens} tokens x {batch}, r={RANK}",
             "",
             f"Measured run ({results.get('started', '?')}, commit "
             f"{results.get('versions', {}).get('git_commit', '?')}): floor {floor_s:.2f} s "
             f"({floor_macs(tokens) * t * BLOCKS / 1e9:.1f} GMAC), PEFT LoRA {lora_s:.2f} s "
             f"of CPU time per step, i.e. LoRA {lora_s - floor_s:.2f} s above the floor, of which its matmuls take "
             f"{BLOCKS * matmul_seconds(lora_mm):.2f} s (timed here).",
             "",
             "| method | scheme | adapter GMAC / step | its matmuls, s (timed here) | floor + matmuls, s "
             "| x LoRA (bound) | measured x LoRA |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for method, scheme in SCHEMES:
        work = adapter_macs(method, scheme, tokens=t) * t * BLOCKS
        mm = seconds(method, scheme)
        bound = floor_s + mm
        measured = arms.get(MEASURED.get((method, scheme), ""), {}).get("cpu_ms")
        lines.append(f"| {LABELS[method]} | {scheme} | {work / 1e9:.1f} | {mm:.2f} | {bound:.2f} | "
                     f"{bound / lora_s:.2f} | " + (f"{measured / 1e3 / lora_s:.2f} |" if measured else "not run |"))
    if build:
        extra = build_seconds()
        lines += ["", "Per group the cheaper of factored and hybrid, the hybrid paying its measured D build and "
                  f"W + D_k sums (attention / MLP up / MLP down: {' / '.join(f'{x:.2f}' for x in extra)} s):", "",
                  "| method | per group | floor + adapter, s | x LoRA (bound) |", "|---|---|---:|---:|"]
        for method in ("tcurlora", "lorapt_frozen_dense"):
            total, picks = floor_s, []
            hybrid_method = "tcurlora" if method == "tcurlora" else "lorapt"
            for g in range(len(groups())):
                fact = seconds(method, "factored", g)
                hyb = seconds(hybrid_method, "hybrid", g) + extra[g]
                total += min(fact, hyb)
                picks.append("hybrid" if hyb < fact else "factored")
            lines.append(f"| {LABELS[method]} | {' / '.join(picks)} | {total:.2f} | {total / lora_s:.2f} |")
    lines += ["", "x LoRA (bound): the measured floor plus the scheme's matmuls timed alone, over LoRA's measured "
              "step: what an implementation of the scheme that cost nothing besides its matmuls would reach here "
              "(timed in isolation, so read +-5%). `hybrid` is the cheapest exact scheme we know (not implemented): "
              "forward and input gradient through W + D_k for free, only the smaller weight gradient paid."]
    return "\n".join(lines)


def work_table(ranks=(8, 16, 32), tokens: int = 64, dims=UNETR_B) -> str:
    """The factored schemes' matmul work by grouping and rank, against the frozen blocks' (counted, not timed): what
    a rank or a grouping adds to a step, whatever the machine."""
    blocks = dims[2]
    floor = floor_macs(tokens, dims) * tokens * blocks
    lines = [f"# Matmul work of the factored adapters on UNETR-B's {blocks} ViT blocks, {tokens} tokens", "",
             "Command: `python benchmarks/flop_bound.py --work "
             f"--ranks {','.join(map(str, ranks))} --tokens {tokens}`",
             "",
             f"Frozen blocks (the Linears' forward and input gradient, attention): {floor / 1e9:.2f} GMAC per step.",
             "", "| method | grouping | r | inner width of each slice's factors (L r) | adapter GMAC / step "
             "| x frozen blocks |", "|---|---|---:|---|---:|---:|"]
    for method in ("tcurlora", "lorapt"):
        for grouping in ("by_shape", "paper"):
            for r in ranks:
                work = adapter_macs(method, "factored", r=r, dims=dims, tokens=tokens, grouping=grouping)
                work *= tokens * blocks
                lq = sorted({n_slices * r for n_slices, *_ in layers(dims, grouping)})
                lines.append(f"| {LABELS[method]} | {grouping} | {r} | {' / '.join(map(str, lq))} | "
                             f"{work / 1e9:.2f} | {work / floor:.2f} |")
    lines += ["", "Per Linear the factored path costs `T L q (n2 + s n1)` multiply-adds forward and up to twice that "
              "backward (`T` tokens, `s` slices of the layer, `L q`: the group's slice count times the rank, the "
              "inner width of every slice's factors). The paper's grouping puts q, k, v and out_proj of all blocks "
              "in one 48-slice tensor: at r=16 the attention factors are 768 wide, as wide as the weights themselves, "
              "where by shape (12-slice groups) they are 192."]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(RESULTS_DIR / "vit_blocks_cpu.json"))
    ap.add_argument("--cell", type=int, default=0, help="index of the (tokens, batch) cell in the results")
    ap.add_argument("--no-build", action="store_true", help="skip timing the D build of the hybrid scheme")
    ap.add_argument("--out", default=None, help="also write the table to this .md file")
    ap.add_argument("--work", action="store_true",
                    help="only count: the factored adapters' matmul work by grouping and rank (no results file, "
                         "no timing)")
    ap.add_argument("--ranks", default="8,16,32", help="with --work: the ranks to count, comma-separated")
    ap.add_argument("--tokens", type=int, default=64, help="with --work: tokens per step (64: a 64^3 input)")
    args = ap.parse_args(argv)
    if args.work:
        text = work_table(tuple(int(r) for r in args.ranks.split(",")), args.tokens)
    else:
        text = report(json.loads(Path(args.results).read_text()), args.cell, build=not args.no_build)
    print(text)
    if args.out:
        from peft_tensor._atomic import atomic_write_text

        atomic_write_text(Path(args.out), text + "\n")


if __name__ == "__main__":
    main()
