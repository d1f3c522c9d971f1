"""Few-shot accuracy benchmark: Dice and HD95 of each arm for N training subjects, over several seeds.

For every N in ``benchmark.n_train``, seed in ``benchmark.seeds`` and arm in ``arms``: fine-tune the pretrained
backbone on N subjects of the target task and evaluate on the held-out test subjects (the same for every N and
seed). Per (arm, N): mean and std over seeds of the per-run mean test Dice / HD95. Everything but the loops is the
demo's: the cohort, the cached pretraining (:func:`peft_tensor.recipes.demo.ensure_backbone`) and fine-tune +
evaluate of one arm (:func:`peft_tensor.recipes.demo.finetune_arm`).

    python benchmarks/fewshot.py                                            # configs/fewshot_cpu.yaml
    python benchmarks/fewshot.py benchmark.seeds=[0,1,2] finetune.train.steps=120
    python benchmarks/fewshot.py data.kind=msd data.root=/data/Task04_Hippocampus \\
        model.pretrained=runs/pretrain/backbone stem=fewshot_msd            # a real dataset, your backbone

Writes ``<output_dir>/<stem>.json`` (config, machine, every run, the aggregate), ``<stem>.md`` and ``<stem>.png``
(Dice vs N per arm). The outputs are rewritten after every run, so an interrupted benchmark leaves the runs done
so far (seeds are the outer loop: the first seed's full grid completes first).
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python benchmarks/<script>.py): the checkout's root, for _common
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

import peft_tensor
from benchmarks._common import CONFIG_DIR, arm_defaults, gap_discriminates, load_average, machine_line
from peft_tensor.recipes.demo import arm_label, ensure_backbone, finetune_arm
from peft_tensor.training import write_json
from peft_tensor.training.arms import format_rates
from peft_tensor.training.config import parse_recipe_args
from peft_tensor.training.loop import configure_threads

DEFAULT_CONFIG = "fewshot_cpu"


def aggregate(runs: list[dict], arms: list[str], ns: list[int]) -> dict:
    """{arm: {N: {metric: {mean, std, n_seeds}}}} over the seeds' per-run mean test metrics."""
    agg = {}
    for arm in arms:
        agg[arm] = {}
        for n in ns:
            sel = [r for r in runs if r["arm"] == arm and r["n_train"] == n]
            if not sel:
                continue
            cell = {}
            for metric in ("dice", "hd95"):
                vals = np.array([r[metric] for r in sel if r[metric] is not None], dtype=float)
                vals = vals[np.isfinite(vals)]
                cell[metric] = {"mean": float(vals.mean()) if vals.size else None,
                                "std": float(vals.std(ddof=1)) if vals.size > 1 else 0.0 if vals.size else None,
                                "n_seeds": int(vals.size)}
            cell["trainable"] = sel[0]["trainable"]
            cell["rates"] = sel[0].get("rates")
            cell["train_s"] = float(np.mean([r["train_s"] for r in sel]))
            agg[arm][str(n)] = cell
    return agg


def markdown(summary: dict) -> str:
    arms, ns = summary["grid"]["arms"], summary["grid"]["n_train"]
    agg = summary["aggregate"]

    def cell(arm, n, metric, digits):
        c = agg.get(arm, {}).get(str(n))
        if not c or c[metric]["mean"] is None:
            return "—"
        return f"{c[metric]['mean']:.{digits}f} ± {c[metric]['std']:.{digits}f} ({c[metric]['n_seeds']})"

    g = summary["grid"]
    lines = [f"# Few-shot accuracy: {summary['data']}", "",
             f"Fine-tuning {g['steps']} steps (batch {g['batch_size']}) per run; seeds {g['seeds']}; "
             f"test: {summary['n_test_cases']} held-out cases, the same for every N and seed. "
             f"Cells: mean ± std over seeds (number of seeds) of the per-run mean over test cases. "
             f"lr: the rate of the adapter's parameters / of the rest (decoder and head), or the one rate of every "
             f"trained parameter; each adapter at its swept registry rate unless the arm sets one.", "",
             f"Runs completed: {len(summary['runs'])} of {g['n_runs']}; wall time {summary['wall_s'] / 60:.1f} min "
             f"({summary['machine']}, {summary['threads']} torch thread(s), load average at start "
             f"{summary['load_average_start']}); backbone: {summary['backbone']}.", ""]
    for metric, label, digits in (("dice", "Dice", 3), ("hd95", "HD95 (mm)", 2)):
        lines += [f"| {label} | trainable | lr (adapter / rest) | " + " | ".join(f"N = {n}" for n in ns) + " |",
                  "|---|---:|---:|" + "---:|" * len(ns)]
        for arm in arms:
            first = next(iter(agg.get(arm, {}).values()), None)
            params = f"{first['trainable']:,}" if first else "—"
            lr = format_rates(first.get("rates")) if first else "—"
            lines.append(f"| {arm} | {params} | {lr} | " + " | ".join(cell(arm, n, metric, digits) for n in ns)
                         + " |")
        lines.append("")
    lines += gap_lines(summary)
    if summary.get("note"):
        lines.append(summary["note"])
    return "\n".join(lines).rstrip() + "\n"


def paired_gaps(runs: list[dict], a: str, b: str, ns: list[int]) -> dict:
    """{N: [Dice of arm a - Dice of arm b, per seed that ran both]}: paired by seed (same batches, same subjects)."""
    out = {}
    for n in ns:
        dice = {(r["arm"], r["seed"]): r["dice"] for r in runs if r["n_train"] == n and r["dice"] is not None}
        seeds = sorted({s for (arm, s) in dice if arm == a} & {s for (arm, s) in dice if arm == b})
        if seeds:
            out[n] = [dice[(a, s)] - dice[(b, s)] for s in seeds]
    return out


def gap_lines(summary: dict) -> list[str]:
    """The ``benchmark.gap`` table: arm a - arm b per N, paired by seed, mean ± std, and whether it discriminates
    (the mean paired gap above twice its std and twice the larger of the two arms' seed std)."""
    gap = summary["grid"].get("gap")
    if not gap:
        return []
    a, b = gap
    ns = summary["grid"]["n_train"]
    gaps = paired_gaps(summary["runs"], a, b, ns)
    if not gaps:
        return []
    lines = [f"Paired gap {a} - {b} (test Dice, same seed):", "",
             "| N | per seed | mean ± std | discriminates |", "|---:|---|---:|---|"]
    for n, g in gaps.items():
        v = np.asarray(g, float)
        sd = float(v.std(ddof=1)) if v.size > 1 else 0.0
        arm_sd = max((summary["aggregate"].get(arm, {}).get(str(n), {}).get("dice", {}).get("std") or 0.0)
                     for arm in (a, b))
        verdict = {None: "—", True: "yes", False: "no"}[gap_discriminates(g, arm_sd)]
        lines.append(f"| {n} | " + " ".join(f"{x:+.3f}" for x in g) + f" | {v.mean():+.3f} ± {sd:.3f} | {verdict} |")
    return lines + [""]


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, cells in summary["aggregate"].items():
        ns = [int(n) for n, c in cells.items() if c["dice"]["mean"] is not None]
        if not ns:
            continue
        m = [cells[str(n)]["dice"]["mean"] for n in ns]
        s = [cells[str(n)]["dice"]["std"] for n in ns]
        ax.errorbar(ns, m, yerr=s, marker="o", capsize=3, label=arm)
    ax.set_xscale("log")
    ax.set_xticks(summary["grid"]["n_train"])
    ax.set_xticklabels([str(n) for n in summary["grid"]["n_train"]])
    ax.minorticks_off()
    ax.set_xlabel("training subjects N")
    ax.set_ylabel("test Dice (mean ± std over seeds)")
    ax.set_title(f"Few-shot fine-tuning, {summary['grid']['steps']} steps, seeds {summary['grid']['seeds']}",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(summary: dict, out: Path, stem: str) -> tuple[Path, Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    js, md, png = out / f"{stem}.json", out / f"{stem}.md", out / f"{stem}.png"
    write_json(js, summary)
    md.write_text(markdown(summary))
    plot(summary, png)
    return js, md, png


def _run_one(cfg: dict, arm, backbone: str, out_dir: str, n: int, seed: int) -> dict:
    """One grid run (fine-tune + evaluate) as the summary's run record; also the worker of ``benchmark.workers``
    (a fresh process: it sets its own thread count first)."""
    configure_threads(cfg.get("threads"))
    r = finetune_arm(cfg, arm, Path(backbone), Path(out_dir), data={**cfg["data"], "n_train": n}, seed=seed)
    t = r.get("test", {})
    return {"arm": arm_label(arm), "n_train": n, "seed": seed, "train_cases": r["n_train"], "steps": r["steps"],
            "dice": t.get("dice", {}).get("mean"), "hd95": t.get("hd95", {}).get("mean"),
            "dice_case_std": t.get("dice", {}).get("std"), "n_test_cases": t.get("dice", {}).get("n"),
            "trainable": r["params"]["trainable"], "train_s": r["train_s"], "setup_s": r["setup_s"],
            "rates": r.get("rates")}


def run_key(cfg: dict, arm, backbone, n: int, seed: int) -> str:
    """What decides a run's weights: the arm (and its method's registry defaults), N, seed, backbone, data, model,
    fine-tuning stage, threads and the package version, as a sha1 (12 hex)."""
    data = {k: v for k, v in cfg["data"].items() if k not in ("cache_dir", "progress", "n_train")}
    key = {"arm": arm, "defaults": arm_defaults(arm), "n": n, "seed": seed, "backbone": str(backbone), "data": data,
           "model": cfg["model"], "finetune": cfg["finetune"], "threads": cfg.get("threads"),
           "device": cfg.get("device"), "version": getattr(peft_tensor, "__version__", "?")}
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def main(cfg: dict) -> dict:
    t_start = time.time()
    bench = cfg["benchmark"]
    ns, seeds = [int(n) for n in bench["n_train"]], [int(s) for s in bench["seeds"]]
    arms = [arm_label(a) for a in cfg["arms"]]
    out, stem = Path(cfg.get("output_dir", "benchmarks/results")), cfg.get("stem", "fewshot_cpu")
    workers = int(bench.get("workers") or 1)
    if workers > 1 and str(cfg.get("threads")).lower() in ("none", "auto", ""):
        raise ValueError(f"benchmark.workers={workers} runs {workers} fine-tunes at once: give threads a count "
                         "(threads=1), so that every run uses the threads it records and the workers do not "
                         "oversubscribe the cores")
    threads = configure_threads(cfg.get("threads"))
    cfg = {**cfg, "threads": threads}  # every run with the threads chosen once, at the start
    load_start = load_average()

    # the pretrained backbone: given by path, or the demo's (pretrained on the source task once, then cached)
    if cfg["model"].get("pretrained"):
        backbone, reused, pretrain_s = Path(cfg["model"]["pretrained"]), True, 0.0
    else:
        pre_dir, reused, pretrain_s = ensure_backbone(cfg)
        backbone = pre_dir / "backbone"

    work = Path(cfg["work_dir"]) if cfg.get("work_dir") else Path(tempfile.mkdtemp(prefix="fewshot_"))
    data_label = ("embedded template-derived hippocampus cohort (synthetic, not patient data)"
                  if cfg["data"].get("kind", "embedded") == "embedded"
                  else f"{cfg['data']['kind']} at {cfg['data'].get('root')}")
    data_label += f", task {cfg['data'].get('task') or 'target'}"
    summary = {
        "data": data_label, "backbone": f"{backbone} ({'reused' if reused else f'pretrained in {pretrain_s:.0f} s'})",
        "grid": {"n_train": ns, "seeds": seeds, "arms": arms, "steps": cfg["finetune"]["train"].get("steps"),
                 "batch_size": cfg["finetune"]["train"].get("batch_size", 2),
                 "n_runs": len(ns) * len(seeds) * len(arms), "workers": workers,
                 "gap": list(bench["gap"]) if bench.get("gap") and set(bench["gap"]) <= set(arms) else None},
        "machine": machine_line(), "threads": threads,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "peft_tensor": getattr(peft_tensor, "__version__", "?")},
        "load_average_start": load_start, "pretrain_s": pretrain_s, "n_test_cases": None,
        "runs": [], "aggregate": {}, "wall_s": 0.0, "config": cfg,
        "note": "N counts subjects; the embedded cohort gives two cases (left and right hippocampus) per subject.",
    }
    # seeds outermost: a complete grid per seed first, so an interrupted run still has whole grids
    jobs = all_jobs = [(arm, n, seed, run_key(cfg, arm, backbone, n, seed))
                       for seed in seeds for n in ns for arm in cfg["arms"]]
    js = out / f"{stem}.json"
    if bench.get("resume") and js.is_file():  # keep the runs of an earlier summary made with the same settings
        wanted = {job[3] for job in jobs}
        kept = [r for r in json.loads(js.read_text()).get("runs", []) if r.get("key") in wanted]
        done = {r["key"] for r in kept}
        for r in kept:
            summary["n_test_cases"] = r.get("n_test_cases", summary["n_test_cases"])
            summary["runs"].append(r)
        jobs = [job for job in jobs if job[3] not in done]
        print(f"[fewshot] resuming {js}: {len(kept)} run(s) kept, {len(jobs)} to run", flush=True)
        if kept:
            summary["aggregate"] = aggregate(summary["runs"], arms, ns)

    def record(run: dict, key: str) -> None:
        summary["n_test_cases"] = run.get("n_test_cases")
        run["key"] = key
        summary["runs"].append(run)
        summary["aggregate"] = aggregate(summary["runs"], arms, ns)
        summary["wall_s"] = time.time() - t_start
        write_outputs(summary, out, stem)

    def folder(arm, n, seed) -> str:
        return str(work / f"seed{seed}" / f"n{n}" / arm_label(arm))

    try:
        if workers == 1:
            for arm, n, seed, key in jobs:
                print(f"[fewshot] seed {seed}, N = {n}, {arm_label(arm)}", flush=True)
                record(_run_one(cfg, arm, str(backbone), folder(arm, n, seed), n, seed), key)
        else:  # fresh (spawned) processes: no OpenMP state forked from this one
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            print(f"[fewshot] {len(jobs)} runs in {workers} worker processes, {threads} thread(s) each", flush=True)
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = {pool.submit(_run_one, cfg, arm, str(backbone), folder(arm, n, seed), n, seed): key
                           for arm, n, seed, key in jobs}
                for fut in as_completed(futures):
                    run = fut.result()
                    print(f"[fewshot] seed {run['seed']}, N = {run['n_train']}, {run['arm']}: test Dice "
                          f"{run['dice']:.3f}", flush=True)
                    record(run, futures[fut])
        order = {(arm_label(a), n, s): i for i, (a, n, s, _) in enumerate(all_jobs)}  # the grid's order
        summary["runs"].sort(key=lambda r: order.get((r["arm"], r["n_train"], r["seed"]), len(order)))
    finally:
        if not cfg.get("work_dir"):
            shutil.rmtree(work, ignore_errors=True)
    summary["wall_s"] = time.time() - t_start
    js, md, png = write_outputs(summary, out, stem)
    print()
    print(md.read_text())
    print(f"wrote {js}, {md}, {png}")
    return summary


if __name__ == "__main__":
    main(parse_recipe_args(description=__doc__.split("\n")[0], default_config=DEFAULT_CONFIG, search=[CONFIG_DIR],
                           schema="fewshot"))
