"""Does a task need the encoder? Test Dice of fine-tuning arms per seed, and the gap between two of them.

For every task in ``--tasks`` (``data.task`` of the embedded cohort: ``target_shift``, the hippocampus under an
acquisition shift from the pretraining data, and ``target``, the same subjects in the pretraining contrast), every
seed and every arm: few-shot fine-tuning with the ``finetune`` recipe (``--config``, default ``finetune_cpu``) from the
backbone ``--backbone``, evaluated on the held-out test subjects. Prints and writes a table per task: Dice per arm
and seed, mean ± sd over seeds, and the gap ``--gap A B`` (default full - decoder_only) per seed (paired: same seed,
same batches), with its mean ± sd. A task discriminates when the mean paired gap exceeds twice its sd and twice the
larger of the two arms' seed sd.

    peft-tensor run pretrain --config pretrain_cpu threads=1 output_dir=runs/pretrain_cpu
    python benchmarks/shift_gap.py --backbone runs/pretrain_cpu/backbone                   # target_shift, 3 seeds
    python benchmarks/shift_gap.py --backbone runs/pretrain_cpu/backbone --tasks target --arms decoder_only frozen
    python benchmarks/shift_gap.py --backbone ... data.shift.contrast=flair data.shift.slice_mm=6   # another design

Every run uses one torch thread (``threads=1``), so a run repeats on any machine load. Writes
``<out>/<stem>.json`` (every run, the config overrides, the acquisition shift) and ``<stem>.md``, rewritten after
every run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the checkout's root, for benchmarks._common
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks._common import gap_discriminates, load_average, machine_line


def stats(values: list) -> tuple[float, float]:
    v = np.asarray(values, float)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def task_table(runs: list[dict], task: str, arms: list[str], seeds: list[int], gap: tuple[str, str]) -> list[str]:
    sel = {(r["arm"], r["seed"]): r for r in runs if r["task"] == task}
    done = [s for s in seeds if all((a, s) in sel for a in arms)]
    lines = [f"| {task} | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd | train s (mean) |",
             "|---|" + "---:|" * (len(seeds) + 2)]
    sds = {}
    for arm in arms:
        vals = [sel[(arm, s)]["dice"] for s in seeds if (arm, s) in sel]
        m, sd = stats(vals) if vals else (float("nan"), float("nan"))
        sds[arm] = sd
        secs = [sel[(arm, s)]["train_s"] for s in seeds if (arm, s) in sel]
        cells = [f"{sel[(arm, s)]['dice']:.3f}" if (arm, s) in sel else "—" for s in seeds]
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {m:.3f} ± {sd:.3f} | "
                     f"{np.mean(secs) if secs else float('nan'):.0f} |")
    a, b = gap
    if a in arms and b in arms and done:
        gaps = [sel[(a, s)]["dice"] - sel[(b, s)]["dice"] for s in done]
        gm, gsd = stats(gaps)
        noise = max(sds.get(a, 0.0), sds.get(b, 0.0))
        verdict = {None: "one seed: no verdict", True: "discriminates",
                   False: "within seed noise"}[gap_discriminates(gaps, noise)]
        lines.append(f"| gap {a} - {b} | " + " | ".join(
            f"{g:+.3f}" if s in done else "—" for s, g in zip(seeds, [dict(zip(done, gaps)).get(s) for s in seeds]))
            + f" | {gm:+.3f} ± {gsd:.3f} | {verdict} (larger arm sd {noise:.3f}) |")
    return lines


def markdown(summary: dict) -> str:
    g = summary["grid"]
    lines = [f"# Encoder or decoder: test Dice per arm and seed ({summary['config']})", "",
             f"Backbone `{summary['backbone']}`; N = {g['n_train']} training subjects (x2 hemispheres), "
             f"{g['steps']} steps, {g['n_test_cases']} held-out test cases; seeds {g['seeds']} (fine-tuning seed: "
             f"init, batches, augmentation; the backbone is fixed). One torch thread per run. Overrides: "
             f"`{' '.join(summary['overrides']) or 'none'}`. Acquisition shift of target_shift: "
             f"`{json.dumps(summary.get('shift'))}`.", "",
             f"Runs: {len(summary['runs'])}; wall {summary['wall_s'] / 60:.1f} min ({summary['machine']}, load "
             f"average at start {summary['load_average_start']}).", ""]
    for task in g["tasks"]:
        lines += task_table(summary["runs"], task, g["arms"], g["seeds"], tuple(g["gap"])) + [""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", required=True, help="the pretrained backbone (model.pretrained)")
    parser.add_argument("--config", default="finetune_cpu")
    parser.add_argument("--tasks", nargs="+", default=["target_shift"])
    parser.add_argument("--arms", nargs="+", default=["full", "decoder_only"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--n-train", type=int, default=10)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--gap", nargs=2, default=["full", "decoder_only"], metavar=("A", "B"))
    parser.add_argument("--out", default="runs/shift_gap")
    parser.add_argument("--stem", default="shift_gap")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. data.shift.contrast=flair)")
    args = parser.parse_args(argv)

    from peft_tensor.data.loaders import load_dataset
    from peft_tensor.recipes import finetune
    from peft_tensor.training import load_config, write_json

    out = Path(args.out)
    t_start = time.time()
    summary = {"config": args.config, "backbone": args.backbone, "overrides": list(args.overrides),
               "grid": {"tasks": args.tasks, "arms": args.arms, "seeds": args.seeds, "n_train": args.n_train,
                        "steps": args.steps, "gap": args.gap, "n_test_cases": None},
               "machine": machine_line(), "load_average_start": load_average(), "runs": [], "wall_s": 0.0}
    for task in args.tasks:
        for seed in args.seeds:  # a complete pair of arms per seed first: an interrupted run still has paired gaps
            for arm in args.arms:
                run_dir = out / args.stem / task / f"seed{seed}" / arm
                cfg = load_config(args.config, [
                    *args.overrides, f"data.task={task}", f"data.n_train={args.n_train}", f"arm.name={arm}",
                    f"seed={seed}", f"train.steps={args.steps}", f"model.pretrained={args.backbone}",
                    f"output_dir={run_dir}", "threads=1", "progress=false", "data.progress=false"])
                if task == "target_shift" and "shift" not in summary:
                    folder = Path(load_dataset(cfg["data"]).extra["folder"])
                    summary["shift"] = json.loads((folder / "cohort.json").read_text())["spec"]["shift"]
                print(f"[shift_gap] {task}, seed {seed}, {arm}", flush=True)
                t0 = time.time()
                r = finetune.main(cfg)
                t = r.get("test", {})
                summary["grid"]["n_test_cases"] = t.get("dice", {}).get("n")
                summary["runs"].append({"task": task, "arm": arm, "seed": seed, "dice": t["dice"]["mean"],
                                        "hd95": t.get("hd95", {}).get("mean"), "train_s": r["train_s"],
                                        "wall_s": time.time() - t0, "trainable": r["params"]["trainable"]})
                summary["wall_s"] = time.time() - t_start
                out.mkdir(parents=True, exist_ok=True)
                write_json(out / f"{args.stem}.json", summary)
                (out / f"{args.stem}.md").write_text(markdown(summary))
    print()
    print(markdown(summary))
    return summary


if __name__ == "__main__":
    main()
