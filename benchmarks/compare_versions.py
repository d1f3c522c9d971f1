"""Step time of the same arms built from two source trees (e.g. a git worktree of an older commit and this checkout),
interleaved in one round robin, as a ratio to the reference arm (PEFT LoRA) of the *same* tree and round.

    git worktree add /tmp/wt-old 3a1c615
    python benchmarks/compare_versions.py --base /tmp/wt-old                       # UNETR-B 64^3, lora/tcurlora/lorapt
    python benchmarks/compare_versions.py --base /tmp/wt-old --steps 15 --arms lora,tcurlora
    python benchmarks/compare_versions.py --base /tmp/wt-old --backbone swinunetr --arms lora,hyps

A regression check between commits must not compare two runs made at different times on a shared machine: the load
changes between them. Here every arm of both trees lives in its own worker process (the tree's own
``benchmarks/efficiency.py`` :class:`ArmWorker`, with that tree on ``PYTHONPATH``), and the parent steps all of them
round-robin, one training step at a time, starting one position later each round. Per tree and arm it reports the
median step time (wall and process CPU) and the median over rounds of the per-round ratio to the tree's reference arm
(the same round's LoRA step): the number a "within x of the ratio" criterion compares.

A process keeps a speed of its own for its lifetime (memory placement; measured: the same arm in two processes 4-5%
apart in every round), which interleaving cannot average out. ``--repeats K`` starts K fresh sets of worker processes
one after the other; the reported ratio is the median over every round of every repeat, and each repeat's own median
is listed, so the spread between processes shows. The arms and backbone come from
this checkout's benchmark config (``benchmarks/configs/efficiency_cpu.yaml`` by default), so both trees build the
same network, input and arm.

Writes ``benchmarks/results/compare_versions_<backbone>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the checkout's root, for _common
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (REPO, RESULTS_DIR, fmt, load_average, load_bench_config, machine_info, median,
                                print_written, round_robin, write_result)

# The worker: runs in the tree's own interpreter environment, reads one JSON command per line, answers "@@" + JSON
# (anything else a library prints on stdout is ignored).
_CHILD = r"""
import json, sys, warnings
sys.path.insert(0, sys.argv[1])
warnings.simplefilter("ignore")
from benchmarks.efficiency import ArmWorker
job = json.loads(sys.stdin.readline())
w = ArmWorker(job)
def answer(x):
    sys.stdout.write("@@" + json.dumps(x, default=str) + "\n"); sys.stdout.flush()
answer(w.ready())
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "close":
        break
    answer(getattr(w, cmd)())
"""


class TreeWorker:
    """One arm of one source tree, in a child process with that tree first on ``sys.path``."""

    def __init__(self, tree: Path, job: dict) -> None:
        env = dict(os.environ, PYTHONPATH=str(tree))
        self.proc = subprocess.Popen([sys.executable, "-u", "-c", _CHILD, str(tree)], cwd=tree, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()

    def _answer(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        raise RuntimeError(f"worker exited with {self.proc.wait()} (its stderr is above)")

    def call(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        try:
            self.proc.stdin.write("close\n")
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def git_head(tree: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def run(cfg: dict, backbone: str, arms: list[str], trees: dict[str, Path], steps: int, warmup: int,
        log=print, repeats: int = 1) -> dict:
    spec, runc = cfg["backbones"][backbone], cfg["run"]
    reference = spec.get("reference", "lora")
    if reference not in arms:
        arms = [reference, *arms]
    unknown = [a for a in arms if a not in spec["arms"]]
    if unknown:
        raise SystemExit(f"arms {unknown} are not in backbone {backbone!r} of the config; it has {list(spec['arms'])}")
    names = [f"{t}:{a}" for t in trees for a in arms]
    load_start = load_average()
    per_repeat: list[dict] = []
    for k in range(repeats):
        workers: dict[str, TreeWorker] = {}
        try:
            for n in names:
                t, a = n.split(":")
                job = {"backbone": spec, "arm": spec["arms"][a], "size": runc["size"], "batch": runc["batch"],
                       "threads": runc["threads"], "device": "cpu", "seed": runc.get("seed", 0)}
                workers[n] = TreeWorker(trees[t], job)
            for n in names:
                workers[n]._answer()  # ready
            for n in names:
                s = workers[n].call("setup")
                log(f"  [{k + 1}/{repeats}] setup {n}: {s['setup_s']:.2f} s, {s['trainable']:,} trainable")
                workers[n].call("train_begin")
            per_repeat.append(round_robin(
                names, lambda n: workers[n].call("step"), warmup + steps, warmup,
                on_round=lambda i: log(f"  [{k + 1}/{repeats}] round {i + 1}/{warmup + steps} "
                                       f"(load {load_average()})")))
        finally:
            for w in workers.values():
                w.close()

    def ratios(rep: dict, t: str, a: str, key: str) -> list[float]:
        return [x[key] / r[key] for x, r in zip(rep[f"{t}:{a}"], rep[f"{t}:{reference}"])]

    rows = []
    for t in trees:
        for a in arms:
            s = [x for rep in per_repeat for x in rep[f"{t}:{a}"]]
            rows.append({
                "tree": t, "commit": git_head(trees[t]), "arm": a,
                "step_s": median([x["wall_s"] for x in s]), "step_cpu_s": median([x["cpu_s"] for x in s]),
                "ratio_wall": median([q for rep in per_repeat for q in ratios(rep, t, a, "wall_s")]),
                "ratio_cpu": median([q for rep in per_repeat for q in ratios(rep, t, a, "cpu_s")]),
                "ratio_wall_by_repeat": [round(median(ratios(rep, t, a, "wall_s")), 4) for rep in per_repeat],
                "wall_samples": [round(x["wall_s"], 4) for x in s],
            })
    return {"backbone": backbone, "model": spec["model"], "size": runc["size"], "threads": runc["threads"],
            "steps": steps, "warmup": warmup, "repeats": repeats, "reference": reference,
            "trees": {t: str(p) for t, p in trees.items()},
            "machine": machine_info(int(runc["threads"])),
            "load_average": {"start": load_start, "end": load_average()}, "rows": rows}


def markdown(res: dict) -> str:
    reps = res.get("repeats", 1)
    lines = [f"# Step time by source tree: {res['backbone']} {res['size']}^3, {res['threads']} thread(s), "
             f"median of {res['steps']} interleaved steps x {reps} set(s) of worker processes", "",
             f"Reference arm: `{res['reference']}` of the same tree and round. Load average: start "
             f"{res['load_average']['start']}, end {res['load_average']['end']}.", "",
             "| tree | commit | arm | step (s) | step CPU (s) | ratio to ref (wall) | ratio to ref (CPU) | "
             "wall ratio per process set |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['tree']} | {r['commit']} | {r['arm']} | {fmt(r['step_s'], '{:.3f}')} | "
                     f"{fmt(r['step_cpu_s'], '{:.3f}')} | {fmt(r['ratio_wall'], '{:.3f}')} | "
                     f"{fmt(r['ratio_cpu'], '{:.3f}')} | "
                     f"{', '.join(f'{q:.3f}' for q in r.get('ratio_wall_by_repeat', []))} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, type=Path, help="the other source tree (e.g. a git worktree)")
    p.add_argument("--head", type=Path, default=REPO, help="this source tree (default: this checkout)")
    p.add_argument("--config", default="efficiency_cpu", help="benchmark config (benchmarks/configs)")
    p.add_argument("--backbone", default="unetr")
    p.add_argument("--arms", default="lora,tcurlora,lorapt", help="comma-separated arm names of the config")
    p.add_argument("--steps", type=int, default=9)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="fresh sets of worker processes, one after the other")
    p.add_argument("--stem", default=None, help="output stem (default compare_versions_<backbone>)")
    args = p.parse_args(argv)
    for t in (args.base, args.head):
        if not (t / "benchmarks" / "efficiency.py").is_file():
            raise SystemExit(f"{t} is not a peft_tensor source tree (no benchmarks/efficiency.py)")
    cfg = load_bench_config(args.config)
    trees = {"base": args.base.resolve(), "head": args.head.resolve()}
    res = run(cfg, args.backbone, args.arms.split(","), trees, args.steps, args.warmup,
              log=lambda m: print(m, file=sys.stderr, flush=True), repeats=args.repeats)
    print_written(*write_result(res, RESULTS_DIR, args.stem or f"compare_versions_{args.backbone}", markdown))


if __name__ == "__main__":
    main()
