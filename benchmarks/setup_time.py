"""Adapter set-up time (``get_peft_model``) of the tensor methods on full-size UNETR-B, and LoRA-PT's error against
the exact truncated t-SVD (issue 13).

Per arm and torch thread count: wall and process CPU time of ``get_peft_model`` (median of ``--reps`` runs, each on a
fresh copy of the same base network; the arms run round-robin, one set-up each per round, their order rotating from
round to round, after one unrecorded round), each arm's time over the first arm's paired by round, the time of each
group's decomposition (tensor CUR / truncated t-SVD, the part the methods differ in), and for LoRA-PT the distance of
the adapter's principal part ``U0 * S0 * V0^T`` from the float64 exact truncated t-SVD of the same group tensor
(``svd_method="full"``), as a fraction of ``max|W|`` and relative in Frobenius norm.

Arms: ``tcurlora`` and ``lorapt`` (paper grouping, r=8, defaults), ``tcurlora_r16`` (the recipes' rank, the paper's
core), ``tcurlora_recipe`` (the recipes' form: r=16, the core in orthonormal coordinates), and
``lorapt_scipy``: the same default t-SVD
run through SciPy's wrappers instead of the GIL-free OpenBLAS calls (what set-up used before; serial whatever the
thread count). ``--weights decaying`` adds a rank-6 component of twice the bulk's spectral norm to every targeted
weight (a synthetic stand-in for trained weights: a few strong directions over a flat bulk); ``random`` (default)
is MONAI's initialisation, whose flat spectra are the hard case for the t-SVD.

    python benchmarks/setup_time.py                                  # UNETR-B, threads 1 and 2, 3 reps
    python benchmarks/setup_time.py --weights decaying --threads 1 --arms lorapt

Writes ``benchmarks/results/<stem>.json`` and ``.md`` (stem ``setup_time_cpu`` or ``setup_time_cpu_<weights>``).
Timing noise: report the load average next to the numbers (it is in the table); on a shared machine process CPU
time is the steadier of the two.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python benchmarks/<script>.py): the checkout's root, for _common
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks._common import RESULTS_DIR, Stopwatch, median, short_commit

TARGETS = ["attn.qkv", "attn.out_proj", "mlp.linear1", "mlp.linear2"]


def build_unetr(seed: int, weights: str) -> torch.nn.Module:
    from monai.networks.nets import UNETR

    torch.manual_seed(seed)
    model = UNETR(in_channels=1, out_channels=2, img_size=64, feature_size=16, hidden_size=768, mlp_dim=3072,
                  num_heads=12, proj_type="conv", norm_name="instance", dropout_rate=0.1)
    if weights == "decaying":
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, module in model.named_modules():
                if isinstance(module, torch.nn.Linear) and any(name.endswith(t) for t in TARGETS):
                    w = module.weight
                    low = torch.randn(w.shape[0], 6, generator=gen) @ torch.randn(6, w.shape[1], generator=gen)
                    w += low * (2 * torch.linalg.matrix_norm(w, 2) / torch.linalg.matrix_norm(low, 2))
    elif weights != "random":
        raise SystemExit(f"--weights must be 'random' or 'decaying', got {weights!r}")
    return model


def peft_config(arm: str):
    from peft_tensor import LoraPTConfig, TCURLoraConfig

    if arm == "tcurlora":
        return TCURLoraConfig(r=8, grouping="paper", target_modules=TARGETS)
    if arm == "tcurlora_r16":  # the recipes' rank (peft_tensor.registry), the paper's core
        return TCURLoraConfig(r=16, grouping="paper", target_modules=TARGETS)
    if arm == "tcurlora_recipe":  # the recipes' form: r=16, the core in orthonormal coordinates (QR per slice)
        return TCURLoraConfig(r=16, grouping="paper", basis="orthonormal", target_modules=TARGETS)
    if arm in ("lorapt", "lorapt_scipy"):
        return LoraPTConfig(r=8, grouping="paper", target_modules=TARGETS)
    raise SystemExit(f"unknown arm {arm!r}: use tcurlora, tcurlora_r16, tcurlora_recipe, lorapt, lorapt_scipy")


class _Recorder:
    """Wraps the decomposition a method's groups call, recording (group shape, wall s, CPU s) per call."""

    def __init__(self):
        self.calls: list[dict] = []
        self._undo = []

    def wrap(self, module, name: str):
        original = getattr(module, name)

        def timed(weight, *args, **kwargs):
            watch = Stopwatch()
            out = original(weight, *args, **kwargs)
            wall, cpu = watch.elapsed()
            self.calls.append({"shape": list(weight.shape), "wall_s": wall, "cpu_s": cpu})
            return out

        setattr(module, name, timed)
        self._undo.append((module, name, original))

    def restore(self):
        for module, name, original in reversed(self._undo):
            setattr(module, name, original)


def set_up(base: torch.nn.Module, arm: str):
    import peft

    from peft_tensor.algebra import _openblas
    from peft_tensor.tuners.lorapt import layer as lorapt_layer
    from peft_tensor.tuners.tcurlora import layer as tcurlora_layer

    rec = _Recorder()
    rec.wrap(lorapt_layer, "truncated_t_svd")
    rec.wrap(tcurlora_layer, "tensor_cur")
    kernels = _openblas.kernels
    if arm == "lorapt_scipy":
        _openblas.kernels = lambda: None
    model = copy.deepcopy(base)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            watch = Stopwatch()
            model = peft.get_peft_model(model, peft_config(arm))
            wall, cpu = watch.elapsed()
    finally:
        _openblas.kernels = kernels
        rec.restore()
    return model, {"wall_s": wall, "cpu_s": cpu, "groups": rec.calls}


def lorapt_error(model) -> list[dict]:
    """Each group's principal part ``U0 * S0 * V0^T`` against the float64 exact truncated t-SVD of its tensor."""
    from peft_tensor.algebra import t_product, t_transpose, truncated_t_svd

    out = []
    for group in model.base_model.groups("default"):
        w = group.stacked_weight().double()
        s0 = group.lorapt_S_init.double()
        core = torch.diag_embed(s0) if group.diagonal else s0
        got = t_product(t_product(group.lorapt_U_init.double(), core), t_transpose(group.lorapt_V_init.double()))
        ex = truncated_t_svd(w, group.rank, method="full")
        exact = t_product(t_product(ex.U, ex.S), t_transpose(ex.V))
        out.append({"group": group.name, "shape": list(w.shape),
                    "max_err_rel_max_w": float((got - exact).abs().max() / w.abs().max()),
                    "fro_err_rel": float((got - exact).norm() / exact.norm())})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arms", nargs="+", default=["tcurlora", "lorapt", "lorapt_scipy"])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="torch thread counts to run each arm with")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--weights", default="random", choices=["random", "decaying"])
    p.add_argument("--no-error", action="store_true", help="skip LoRA-PT's error (float64 full t-SVDs: ~1 min)")
    p.add_argument("--stem", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true",
                   help="time each set-up in a new process (a user's first get_peft_model; within one process "
                        "later set-ups slow down as the allocator's state ages, by up to 2x)")
    p.add_argument("--baseline", default=None, metavar="DIR",
                   help="with --fresh: also time --baseline-arms with the peft_tensor of the checkout DIR (e.g. a git "
                        "worktree of an earlier commit), labelled ARM@baseline")
    p.add_argument("--baseline-arms", nargs="+", default=None,
                   help="arms to time from --baseline (default: the first)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a --fresh child: time one set-up, print JSON
    p.add_argument("--root", default=None, help=argparse.SUPPRESS)  # the child's peft_tensor checkout
    args = p.parse_args(argv)
    stem = args.stem or ("setup_time_cpu" if args.weights == "random" else f"setup_time_cpu_{args.weights}")
    if args.one:
        if args.root:
            sys.path.insert(0, str(Path(args.root).resolve()))
        torch.set_num_threads(args.threads[0])
        _, timing = set_up(build_unetr(args.seed, args.weights), args.one)
        import peft_tensor

        timing["checkout"] = str(Path(peft_tensor.__file__).resolve().parents[1])  # whose code ran
        print("TIMING " + json.dumps(timing))
        return 0
    if args.baseline and not args.fresh:
        raise SystemExit("--baseline needs --fresh (the two checkouts' code runs in separate processes)")
    labels = list(args.arms)
    if args.baseline:
        labels += [f"{arm}@baseline" for arm in (args.baseline_arms or args.arms[:1])]

    base = None if args.fresh else build_unetr(args.seed, args.weights)
    res = {"command": " ".join(["python", "benchmarks/setup_time.py", *(argv if argv is not None else sys.argv[1:])]),
           "machine": {"cpu": platform.processor() or platform.machine(), "logical_cores": os.cpu_count(),
                       "torch": torch.__version__, "platform": platform.platform()},
           "weights": args.weights, "reps": args.reps, "fresh_process": args.fresh, "runs": []}
    if args.baseline:
        res["baseline"] = {"dir": args.baseline, "commit": short_commit(args.baseline) or "unknown"}
    error = None  # LoRA-PT's error, measured once
    for threads in args.threads:
        torch.set_num_threads(threads)
        # the arms round-robin, one set-up each per round: a process's set-ups slow down as it ages (measured: the
        # third arm run back-to-back took 2x its time when run first), so every arm sees the same drift.
        # The arms' order rotates from round to round (a set-up's position in the round changes its time: the
        # allocator's state), and one unrecorded round warms the process up first.
        runs = {arm: [] for arm in labels}
        load = os.getloadavg()[0]
        if not args.fresh:
            for arm in labels:
                set_up(base, arm)  # the warm-up round, not recorded
        for rnd in range(args.reps):
            for arm in labels[rnd % len(labels):] + labels[:rnd % len(labels)]:
                if args.fresh:
                    model, timing = None, _fresh_set_up(arm, threads, args)
                else:
                    model, timing = set_up(base, arm)
                runs[arm].append(timing)
                print(f"{arm:13s} threads {threads}: wall {timing['wall_s']:.2f} s, CPU {timing['cpu_s']:.2f} s "
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)
                if arm == "lorapt" and not args.no_error and error is None:
                    error = lorapt_error(model if model is not None else set_up(build_unetr(args.seed, args.weights),
                                                                                arm)[0])
                del model
        for arm in labels:
            entry = {"arm": arm, "threads": threads, "load_average_1min": [load, os.getloadavg()[0]],
                     "wall_s": median([r["wall_s"] for r in runs[arm]]),
                     "cpu_s": median([r["cpu_s"] for r in runs[arm]]),
                     "wall_s_all": [r["wall_s"] for r in runs[arm]], "cpu_s_all": [r["cpu_s"] for r in runs[arm]],
                     "groups": _group_medians(runs[arm]), "interleaved": True,
                     # paired by round (the arms of a round run back to back): steadier than a ratio of medians when
                     # the machine's speed shifts between rounds (measured: the same set-up at 0.7, 1.1 and 2.1 s)
                     "wall_ratio_to_first": median([r["wall_s"] / f["wall_s"]
                                                    for r, f in zip(runs[arm], runs[labels[0]])])}
            if arm == "lorapt" and error is not None and not any("error" in e for e in res["runs"]):
                entry["error"] = error
            res["runs"].append(entry)
    RESULTS_DIR.mkdir(exist_ok=True)
    from peft_tensor._atomic import atomic_write_text

    atomic_write_text(RESULTS_DIR / f"{stem}.json", json.dumps(res, indent=1) + "\n")
    table = render(res)
    atomic_write_text(RESULTS_DIR / f"{stem}.md", table)
    print(table)
    return 0


def _fresh_set_up(label: str, threads: int, args) -> dict:
    """One set-up in a new process (``--one``); ``ARM@baseline`` runs the code of the ``--baseline`` checkout."""
    import subprocess

    arm, _, where = label.partition("@")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", arm, "--threads", str(threads),
           "--weights", args.weights, "--seed", str(args.seed)]
    if where:
        cmd += ["--root", args.baseline]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("TIMING ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"set-up of {label} failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
    return json.loads(lines[-1][len("TIMING "):])


def _group_medians(runs: list[dict]) -> list[dict]:
    out = []
    for i, call in enumerate(runs[0]["groups"]):
        out.append({"shape": call["shape"], "wall_s": median([r["groups"][i]["wall_s"] for r in runs]),
                    "cpu_s": median([r["groups"][i]["cpu_s"] for r in runs])})
    return out


def render(res: dict) -> str:
    m = res["machine"]
    lines = [f"# Set-up time: UNETR-B, paper grouping, r=8 unless the arm says ({res['weights']} weights)", "",
             f"`{res['command']}`", "",
             f"Machine: {m['cpu']}, {m['logical_cores']} logical cores, torch {m['torch']}, {m['platform']}. "
             f"Median of {res['reps']} runs of `get_peft_model` each"
             + (", each in a new process" if res.get("fresh_process") else "")
             + (f"; ARM@baseline: the code of commit {res['baseline']['commit']}" if res.get("baseline") else "")
             + "; CPU = process CPU time (all threads). "
             "Groups: the decomposition of each group tensor (L x n1 x n2), wall / CPU s.", "",
             "Ratio: this arm's wall time over the first arm's in the same round, median over the rounds.", "",
             "| arm | torch threads | wall s | CPU s | ratio | groups (wall / CPU s) | load average (1 min, before / "
             "after) |",
             "|---|---:|---:|---:|---:|---|---|"]
    for r in res["runs"]:
        groups = "; ".join(f"{'x'.join(map(str, g['shape']))}: {g['wall_s']:.2f} / {g['cpu_s']:.2f}"
                           for g in r["groups"])
        load = " / ".join(f"{x:.1f}" for x in r["load_average_1min"])
        ratio = f"{r['wall_ratio_to_first']:.3f}" if "wall_ratio_to_first" in r else "-"
        lines.append(f"| {r['arm']} | {r['threads']} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {ratio} | {groups} | "
                     f"{load} |")
    for r in res["runs"]:
        if "error" in r:
            lines += ["", "LoRA-PT principal part vs the float64 exact truncated t-SVD (`svd_method=\"full\"`):", "",
                      "| group | shape | max error / max abs(W) | Frobenius error, relative |", "|---|---|---:|---:|"]
            for e in r["error"]:
                lines.append(f"| {e['group']} | {'x'.join(map(str, e['shape']))} | {e['max_err_rel_max_w']:.1e} | "
                             f"{e['fro_err_rel']:.1e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
