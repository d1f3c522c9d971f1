"""Learning panel (issue 22): does each method's adapter alone learn on every backbone and target task?

For every pretrained backbone in ``backbones`` (a pretraining recipe config + overrides, pretrained once with the
panel's pinned ``threads`` and cached under ``<cache_dir>/panel-backbone-<config hash>``), every target task in
``tasks`` (``data.task`` of the embedded cohort: ``target``, the hemisphere hippocampus; ``target_shift``, the same
subjects under an acquisition shift) and every arm in ``arms`` (by default the adapter alone, ``decoder: head``, of
tCURLoRA, LoRA-PT, HyPS and PEFT LoRA r=8, each at its registry rate, and ``frozen``, the head alone): few-shot
fine-tuning with the ``finetune`` recipe config for ``steps`` steps, the validation Dice every ``eval_every`` steps
(the recipes' ``train.val_every``: the learning curve), the test Dice over the held-out subjects at the end.

Prints and writes, per cell (backbone x task): each arm's test Dice, its ratio to the reference arm (PEFT LoRA),
its margin over the floor arm (frozen), the number of steps it needs to reach ``criterion.reach`` (90%) of its final
validation Dice, and whether it meets the issue's criterion (>= ``min_ratio`` x LoRA and >= frozen +
``min_margin``); each arm's learning rates; the backbones (config hash, sha256 of the weights).

    python benchmarks/learning_panel.py                   # configs/learning_panel_cpu.yaml: 3 x 2 cells, 150 steps
    python benchmarks/learning_panel.py --budget reduced  # every cell, 40 steps
    python benchmarks/learning_panel.py --budget ci       # the CI guard's panel (one small backbone, one task)
    python benchmarks/learning_panel.py tasks=[target_shift] 'arms={lora: {name: lora, r: 8, decoder: head}}'

Writes ``<output_dir>/<stem>.json`` (config, backbones, machine, every run with its curve) and ``<stem>.md``,
rewritten after every run; with ``resume: true`` a rerun keeps the runs of an earlier ``<stem>.json`` whose resolved
fine-tuning config (and backbone) is the same, so an interrupted panel continues where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python benchmarks/<script>.py): the checkout's root, for _common
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import CONFIG_DIR, arm_defaults, load_average, machine_line

DEFAULT_CONFIG = "learning_panel_cpu"
# keys of a recipe config that do not change the weights a run produces
_VOLATILE = ("output_dir", "progress")
_VOLATILE_DATA = ("cache_dir", "progress")


# -- config -----------------------------------------------------------------------------------------------------------
def load_panel_config(name: str = DEFAULT_CONFIG, overrides=None, budget: str | None = None) -> dict:
    """The panel config ``name`` (benchmarks/configs first) with ``budgets[budget]``'s keys replacing its own, then
    ``overrides`` (``key.sub=value``) applied."""
    from peft_tensor.training.config import apply_overrides, load_config

    cfg = load_config(name, [], search=[CONFIG_DIR], schema=None)
    budgets = cfg.pop("budgets", None) or {}
    if budget is not None:
        if budget not in budgets:
            raise ValueError(f"budget {budget!r} is not in the config's budgets: choose one of {sorted(budgets)}")
        cfg.update(copy.deepcopy(budgets[budget]))
        cfg["budget"] = budget
    cfg = apply_overrides(cfg, list(overrides or []))
    for key in ("backbones", "tasks", "arms", "finetune", "steps", "criterion"):
        if not cfg.get(key):
            raise ValueError(f"the panel config needs {key!r}")
    for key, kind, example in (("backbones", dict, "'backbones={demo: {config: pretrain_cpu, overrides: []}}'"),
                               ("arms", dict, "'arms={lora: {name: lora, r: 8, decoder: head}, ...}'"),
                               ("tasks", list, "'tasks=[target]'"), ("finetune", dict, "finetune.config=finetune_cpu"),
                               ("criterion", dict, "criterion.min_ratio=0.9")):
        if not isinstance(cfg[key], kind):
            raise ValueError(f"{key} must be a {'mapping' if kind is dict else 'list'}, got {cfg[key]!r}: "
                             f"e.g. {example}")
    seeds = cfg.get("seeds")
    if seeds is None:
        seeds = [cfg["seed"]]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(v, int) and not isinstance(v, bool)
                                                             for v in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be a list of distinct integers, got {seeds!r}: e.g. 'seeds=[0, 1, 2]'")
    cfg["seeds"] = seeds
    crit = cfg["criterion"]
    for role in ("reference", "floor"):
        if crit[role] not in cfg["arms"]:
            raise ValueError(f"criterion.{role} {crit[role]!r} is not one of the arms {sorted(cfg['arms'])}")
    return cfg


def config_hash(cfg: dict) -> str:
    """sha1 (12 hex) of a resolved recipe config without the keys that do not change its weights (output folder,
    progress bars, cohort cache folder)."""
    key = {k: v for k, v in cfg.items() if k not in _VOLATILE}
    if isinstance(key.get("data"), dict):
        key["data"] = {k: v for k, v in key["data"].items() if k not in _VOLATILE_DATA}
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _common_overrides(cfg: dict) -> list[str]:
    over = [f"threads={cfg['threads']}", "progress=false", "data.progress=false"]
    if cfg.get("cache_dir"):
        over.append(f"data.cache_dir={cfg['cache_dir']}")
    return over


def cache_root(cfg: dict) -> Path:
    from peft_tensor.data.embedded import default_cache_dir

    return Path(cfg.get("cache_dir") or default_cache_dir())


def pretrain_config(cfg: dict, spec: dict) -> dict:
    """The resolved pretraining config of a backbone ``spec`` (``{config, overrides}``), threads pinned."""
    from peft_tensor.training.config import load_config

    over = [*(spec.get("overrides") or []), *_common_overrides(cfg), "output_dir=."]
    return load_config(spec["config"], over, schema="pretrain")


def finetune_config(cfg: dict, backbone: Path, task: str, arm: dict, out_dir: Path, seed: int | None = None) -> dict:
    """The resolved fine-tuning config of one run: the panel's ``finetune`` config and overrides, the task, the arm,
    the fine-tuning seed (``seed``, else the config's ``seed``), the step budget and validation interval, the
    backbone, threads pinned, no resumable checkpoint."""
    from peft_tensor.training.config import load_config

    ft = cfg["finetune"]
    run_cfg = load_config(ft["config"], [
        *(ft.get("overrides") or []), *_common_overrides(cfg), f"data.task={task}",
        f"seed={cfg['seed'] if seed is None else seed}",
        f"train.steps={cfg['steps']}", f"train.val_every={cfg.get('eval_every') or 0}", "train.checkpoint_every=0",
        f"model.pretrained={backbone}", f"output_dir={out_dir}"], schema=None)
    run_cfg["arm"] = dict(arm)
    from peft_tensor.training.schema import validate_config

    return validate_config(run_cfg, "finetune")


# -- backbones --------------------------------------------------------------------------------------------------------
def ensure_backbone(cfg: dict, name: str, spec: dict) -> dict:
    """Pretrain the backbone ``spec`` once into ``<cache>/panel-backbone-<hash>`` (a finished one is reused: it has
    ``panel_backbone.json``); its record: name, config, hash, folder, sha256 of the weights, pretraining seconds."""
    from peft_tensor.recipes import pretrain
    from peft_tensor.training import write_json

    pre_cfg = pretrain_config(cfg, spec)
    digest = config_hash(pre_cfg)
    folder = cache_root(cfg) / f"panel-backbone-{digest}"
    marker = folder / "panel_backbone.json"
    if marker.is_file():
        record = json.loads(marker.read_text())
        print(f"[panel] backbone {name}: reusing {folder}", flush=True)
        return {**record, "name": name, "reused": True}
    print(f"[panel] backbone {name}: pretraining {pre_cfg['train']['steps']} steps -> {folder}", flush=True)
    t0 = time.time()
    pretrain.main({**pre_cfg, "output_dir": str(folder)})  # resumes its own checkpoint after an interruption
    weights = folder / "backbone" / "model.safetensors"
    record = {"config": spec["config"], "overrides": list(spec.get("overrides") or []), "hash": digest,
              "path": str(folder / "backbone"), "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
              "threads": pre_cfg["threads"], "steps": pre_cfg["train"]["steps"], "pretrain_s": time.time() - t0}
    write_json(marker, record)
    return {**record, "name": name, "reused": False}


# -- one run and its curve --------------------------------------------------------------------------------------------
def val_curve(run_dir: Path) -> list[list]:
    """``[[step, val Dice], ...]`` from a run's ``metrics.jsonl`` (steps counted from 1)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [[int(r["step"]) + 1, float(r["val_dice"])] for r in rows if r.get("val_dice") is not None]


def steps_to_reach(curve: list, fraction: float = 0.9) -> int | None:
    """The first evaluated step whose validation Dice is at least ``fraction`` x the last evaluation's (the run's
    final Dice); None without a curve or when the final Dice is not positive."""
    if not curve or curve[-1][1] <= 0:
        return None
    goal = fraction * curve[-1][1]
    return next(step for step, dice in curve if dice >= goal)


def run_cell(cfg: dict, backbone: dict, task: str, label: str, arm: dict, work: Path, seed: int | None = None) -> dict:
    """Fine-tune and evaluate one arm on one task from one backbone with one fine-tuning seed; the run's row."""
    from peft_tensor.recipes import finetune

    seed = cfg["seed"] if seed is None else seed
    run_dir = work / backbone["name"] / task / label / f"seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, never a resumed one
    run_cfg = finetune_config(cfg, Path(backbone["path"]), task, arm, run_dir, seed)
    t0, c0 = time.time(), time.process_time()
    res = finetune.main(copy.deepcopy(run_cfg))
    wall, cpu = time.time() - t0, time.process_time() - c0
    curve = val_curve(run_dir)
    test = res["test"]["dice"]
    return {"backbone": backbone["name"], "task": task, "arm": label, "method": arm["name"], "seed": seed,
            "key": run_key(cfg, backbone, task, arm, seed), "rates": res.get("rates"),
            "trainable": res["params"]["trainable"], "steps": res["steps"], "dice": test["mean"],
            "dice_case_std": test["std"], "n_test_cases": test["n"],
            "curve": curve, "steps_to_reach": steps_to_reach(curve, float(cfg["criterion"].get("reach", 0.9))),
            "setup_s": res.get("setup_s"), "train_s": res["train_s"], "wall_s": wall, "cpu_s": cpu,
            "threads": run_cfg["threads"]}


def run_key(cfg: dict, backbone: dict, task: str, arm: dict, seed: int | None = None) -> str:
    """What makes two runs the same: the backbone's weights, the resolved fine-tuning config (its seed included) and
    the registry's defaults for the arm (rank, rates, weight decay: :func:`benchmarks._common.arm_defaults`)."""
    key = [backbone["sha256"], config_hash(finetune_config(cfg, Path(backbone["path"]), task, arm, Path("."), seed))]
    defaults = arm_defaults(arm)
    if defaults is not None:  # an arm the registry has nothing for keeps the key it had
        key.append(defaults)
    return hashlib.sha1(json.dumps(key).encode()).hexdigest()[:12]


# -- the criterion and the tables -------------------------------------------------------------------------------------
def run_seed(run: dict, default: int = 0) -> int:
    """A run's fine-tuning seed (summaries written before ``seeds`` existed: the panel's ``seed``)."""
    return int(run.get("seed", default))


def dice_by_seed(runs: list[dict], default_seed: int = 0) -> dict:
    """{(backbone, task, arm): {seed: Dice}} of the runs."""
    out: dict = {}
    for r in runs:
        out.setdefault((r["backbone"], r["task"], r["arm"]), {})[run_seed(r, default_seed)] = r["dice"]
    return out


def assess(runs: list[dict], criterion: dict, default_seed: int = 0) -> dict:
    """{(backbone, task, arm): {dice, seeds, ratio, margin, passed}}: each arm's mean Dice over its cell's seeds, its
    ratio to the reference arm's mean and its margin over the floor arm's, both over the seeds the two arms share
    (paired), and ``passed`` (both thresholds met; None for the reference and floor arms, or when either is missing
    from the cell)."""
    ref, floor = criterion["reference"], criterion["floor"]
    by = dice_by_seed(runs, default_seed)
    out = {}
    for (b, t, a), dice in by.items():
        def paired(other):
            o = by.get((b, t, other), {})
            common = sorted(set(dice) & set(o))
            if not common:
                return None, None
            return (sum(dice[s] for s in common) / len(common), sum(o[s] for s in common) / len(common))

        mine, rd = paired(ref)
        ratio = mine / rd if rd else None
        mine_f, fd = paired(floor)
        margin = mine_f - fd if fd is not None else None
        passed = None
        if a not in (ref, floor) and ratio is not None and margin is not None:
            passed = ratio >= float(criterion["min_ratio"]) and margin >= float(criterion["min_margin"]) - 1e-12
        out[(b, t, a)] = {"dice": sum(dice.values()) / len(dice), "seeds": sorted(dice), "ratio": ratio,
                          "margin": margin, "passed": passed}
    return out


def ratio_interval(mine: dict, ref: dict, level: float = 0.9, max_exact: int = 6, draws: int = 20000):
    """The ratio of paired means ``mean(mine) / mean(ref)`` over the seeds both have, and its ``level`` bootstrap
    interval over those seeds: every resample of the seeds with replacement (``n ** n`` of them, exact and
    deterministic for ``n <= max_exact``), else ``draws`` resamples from a fixed generator. ``(ratio, low, high)``;
    ``None`` with fewer than two shared seeds or a reference mean of zero. The percentile interval says how far
    the cell's ratio moves with the draw of its seeds; it does not change the criterion, which is on the ratio."""
    common = sorted(set(mine) & set(ref))
    n = len(common)
    a, b = [mine[s] for s in common], [ref[s] for s in common]
    if n < 2 or sum(b) == 0:
        return None
    if n <= max_exact:
        samples = itertools.product(range(n), repeat=n)
    else:
        import random

        rng = random.Random(0)
        samples = ([rng.randrange(n) for _ in range(n)] for _ in range(draws))
    sums = ((sum(a[i] for i in idx), sum(b[i] for i in idx)) for idx in samples)
    ratios = sorted(x / y for x, y in sums if y > 0)
    tail = (1.0 - level) / 2

    def pick(q):  # the lower empirical quantile: a resample's ratio, never interpolated
        return ratios[min(len(ratios) - 1, max(0, int(q * len(ratios))))]

    return sum(a) / sum(b), pick(tail), pick(1.0 - tail)


def _f(v, spec="{:.3f}"):
    return "—" if v is None else spec.format(v)


def _interval_table(runs, crit, default_seed, backbones, tasks, judged, level: float = 0.9) -> list[str]:
    """Per cell and judged arm: its ratio to the reference (paired by seed) with a bootstrap interval over the seeds
    (:func:`ratio_interval`), and whether the whole interval lies above or below ``min_ratio``."""
    by = dice_by_seed(runs, default_seed)
    least = float(crit["min_ratio"])
    out = ["", f"Ratio to {crit['reference']} with its {100 * level:.0f}% bootstrap interval over the seeds (every "
           "resample of the cell's seeds with replacement): *above* / *below* when the whole interval is on one side "
           f"of {least:g}, *within* when it straddles it (the seeds cannot tell; the verdict above stays the "
           "ratio's).", "", "| backbone | task | " + " | ".join(judged) + " |", "|---|---|" + "---:|" * len(judged)]
    for b in backbones:
        for t in tasks:
            cells = []
            for a in judged:
                got = ratio_interval(by.get((b, t, a), {}), by.get((b, t, crit["reference"]), {}), level)
                if got is None:
                    cells.append("—")
                    continue
                ratio, low, high = got
                side = "above" if low >= least else "below" if high < least else "within"
                cells.append(f"{ratio:.3f} [{low:.2f}, {high:.2f}] {side}")
            out.append(f"| {b} | {t} | " + " | ".join(cells) + " |")
    return out


def summed_ratio(runs: list[dict], arm: str, reference: str, default_seed: int = 0) -> float | None:
    """``arm``'s test Dice summed over the (backbone, task, seed) runs it shares with ``reference``, over the
    reference's sum on the same runs: one number for the whole panel (``None``: no shared run)."""
    by = dice_by_seed(runs, default_seed)
    pairs = [(seeds[s], by[(b, t, reference)][s]) for (b, t, a), seeds in by.items() if a == arm
             for s in seeds.keys() & by.get((b, t, reference), {}).keys()]
    total = sum(ref for _, ref in pairs)
    return sum(mine for mine, _ in pairs) / total if pairs and total > 0 else None


def markdown(summary: dict) -> str:
    from peft_tensor.training.arms import format_rates

    cfg, runs = summary["config"], summary["runs"]
    crit = cfg["criterion"]
    default_seed = cfg.get("seed", 0)
    verdicts = assess(runs, crit, default_seed)
    seeds = cfg.get("seeds") or [default_seed]
    multi = len(seeds) > 1
    by = {(r["backbone"], r["task"], r["arm"], run_seed(r, default_seed)): r for r in runs}
    arms, tasks, backbones = list(cfg["arms"]), cfg["tasks"], list(cfg["backbones"])
    judged = [a for a in arms if a not in (crit["reference"], crit["floor"])]
    n_cells = len(backbones) * len(tasks)
    from peft_tensor.training.arms import PEFT_ARMS, canonical_arm, trains_decoder

    adapters = [dict(a) for a in cfg["arms"].values()
                if isinstance(a, dict) and canonical_arm(a.get("name", "full")) in PEFT_ARMS]
    what = ("adapters with the decoder training" if any(trains_decoder(a) for a in adapters)
            else "the adapter alone")
    lines = [f"# Learning panel: {what} on {len(backbones)} backbone(s) x {len(tasks)} task(s)"
             + (f" (budget `{cfg['budget']}`)" if cfg.get("budget") else ""), "",
             f"Each cell: few-shot fine-tuning ({summary['n_train']} training subjects x 2 hemispheres) for "
             f"{cfg['steps']} steps from the cell's backbone on its task, test Dice over {summary['n_test_cases']} "
             "held-out cases, " + (f"fine-tuning seeds {', '.join(map(str, seeds))} (a cell: the mean over its "
                                    "seeds; ratios and margins paired by seed)" if multi else f"seed {seeds[0]}")
             + f", {cfg['threads']} torch thread(s) per run; recipe config "
             f"`{cfg['finetune']['config']}`" + (f" + `{' '.join(cfg['finetune']['overrides'])}`"
                                                  if cfg['finetune'].get('overrides') else "") + ". "
             f"Criterion: each method's arm ({what}) >= {crit['min_ratio']:g}x the Dice of "
             f"{crit['reference']} and >= {crit['floor']} + {crit['min_margin']:g}. Steps to "
             f"{100 * float(crit.get('reach', 0.9)):.0f}%: the first validation (every {cfg.get('eval_every')} steps)"
             f" at {100 * float(crit.get('reach', 0.9)):.0f}% of the run's final validation Dice.", "",
             "Test Dice" + (" (mean over the seeds)" if multi else "") + " (✓ / ✗: the criterion):", "",
             "| backbone | task | " + " | ".join(arms) + " |", "|---|---|" + "---:|" * len(arms)]
    for b in backbones:
        for t in tasks:
            cells = []
            for a in arms:
                v = verdicts.get((b, t, a))
                if not v:
                    cells.append("—")
                    continue
                mark = {True: " ✓", False: " ✗"}.get(v.get("passed"), "")
                short = f" ({len(v['seeds'])} of {len(seeds)})" if multi and len(v["seeds"]) < len(seeds) else ""
                cells.append(f"{v['dice']:.3f}{mark}{short}")
            lines.append(f"| {b} | {t} | " + " | ".join(cells) + " |")
    passes = {a: sum(1 for b in backbones for t in tasks if verdicts.get((b, t, a), {}).get("passed")) for a in judged}
    lines += ["", "Cells passing: " + ", ".join(f"{a} {passes[a]} / {n_cells}" for a in judged) + "."]
    summed = {a: summed_ratio(runs, a, crit["reference"], default_seed) for a in judged}
    if any(v is not None for v in summed.values()):
        lines += ["", f"Dice summed over the runs each arm shares with {crit['reference']} (paired by cell and "
                  f"seed), over {crit['reference']}'s: "
                  + ", ".join(f"{a} {v:.3f}x" for a, v in summed.items() if v is not None)
                  + " (descriptive: the criterion is per cell)."]
    if multi:
        lines += _interval_table(runs, crit, default_seed, backbones, tasks, judged)
    lines += ["",
              "| backbone | task | arm |" + (" seed |" if multi else "") + " lr (adapter / rest) | trainable | "
              f"test Dice | ÷ {crit['reference']} | − {crit['floor']} | steps to "
              f"{100 * float(crit.get('reach', 0.9)):.0f}% | val Dice curve | pass |",
              "|---|---|---|" + ("---:|" if multi else "") + "---:|---:|---:|---:|---:|---:|---|:---:|"]
    for b in backbones:
        for t in tasks:
            for a in arms:
                for seed in seeds:
                    r = by.get((b, t, a, seed))
                    if not r:
                        continue
                    # per run: against the reference / floor run of the same seed; the verdict is the cell's
                    ref, floor = by.get((b, t, crit["reference"], seed)), by.get((b, t, crit["floor"], seed))
                    ratio = r["dice"] / ref["dice"] if ref and ref["dice"] else None
                    margin = r["dice"] - floor["dice"] if floor else None
                    cell = verdicts[(b, t, a)]
                    curve = " ".join(f"{d:.2f}" for _, d in r["curve"])
                    passed = {True: "pass", False: "FAIL"}.get(cell["passed"], "ref" if a == crit["reference"]
                                                                else "floor" if a == crit["floor"] else "—")
                    lines.append(f"| {b} | {t} | {a} |" + (f" {seed} |" if multi else "")
                                 + f" {format_rates(r.get('rates'))} | {r['trainable']:,} | "
                                 f"{r['dice']:.3f} ± {r['dice_case_std']:.3f} | {_f(ratio, '{:.2f}')} | "
                                 f"{_f(margin, '{:+.3f}')} | {_f(r['steps_to_reach'], '{}')} | {curve} | "
                                 f"{passed} |")
    lines += ["", "Backbones (pretrained once each, cached by the hash of their resolved config):", "",
              "| backbone | pretraining config | steps | threads | config hash | weights sha256 | pretraining |",
              "|---|---|---:|---:|---|---|---:|"]
    for name in backbones:
        bb = summary["backbones"].get(name)
        if bb:
            over = " ".join(bb["overrides"])
            lines.append(f"| {name} | `{bb['config']}{' ' + over if over else ''}` | {bb['steps']} | "
                         f"{bb['threads']} | `{bb['hash']}` | `{bb['sha256'][:16]}` | {bb['pretrain_s']:.0f} s"
                         f"{' (cached)' if bb.get('reused') else ''} |")
    n_runs = len(backbones) * len(tasks) * len(arms) * len(seeds)
    cpu = sum(r["cpu_s"] for r in runs)
    lines += ["", f"Runs: {len(runs)} of {n_runs}; fine-tuning wall {sum(r['wall_s'] for r in runs) / 60:.1f} min, "
              f"process CPU {cpu / 60:.1f} min; panel wall {summary['wall_s'] / 60:.1f} min ({summary['machine']}, "
              f"load average at start {summary['load_average_start']})."]
    if summary.get("command"):
        lines += ["", f"Command: `{summary['command']}`"]
    return "\n".join(lines) + "\n"


# -- the panel --------------------------------------------------------------------------------------------------------
def main(cfg: dict, command: str | None = None) -> dict:
    """Run the panel of ``cfg`` (:func:`load_panel_config`); the summary (also written to ``<output_dir>/<stem>``)."""
    import torch

    from peft_tensor.training import write_json

    threads_before = torch.get_num_threads()
    out, stem = Path(cfg["output_dir"]), cfg["stem"]
    js = out / f"{stem}.json"
    work = Path(cfg["work_dir"]) if cfg.get("work_dir") else Path(tempfile.mkdtemp(prefix="learning_panel_"))
    t_start = time.time()
    earlier = {}
    if cfg.get("resume") and js.is_file():
        earlier = {r["key"]: r for r in json.loads(js.read_text()).get("runs", []) if r.get("key")}
    summary = {"config": cfg, "command": command, "machine": machine_line(), "load_average_start": load_average(),
               "backbones": {}, "runs": [], "n_train": None, "n_test_cases": None, "wall_s": 0.0}
    try:
        for name, spec in cfg["backbones"].items():
            summary["backbones"][name] = backbone = ensure_backbone(cfg, name, spec)
            for task, (label, arm), seed in itertools.product(cfg["tasks"], cfg["arms"].items(), cfg["seeds"]):
                key = run_key(cfg, backbone, task, arm, seed)
                where = f"{name} / {task} / {label}" + (f" / seed {seed}" if len(cfg["seeds"]) > 1 else "")
                if key in earlier:
                    row = {**earlier[key], "backbone": name, "arm": label, "seed": seed}
                    print(f"[panel] {where}: kept from {js}", flush=True)
                else:
                    print(f"[panel] {where}: {cfg['steps']} steps", flush=True)
                    row = run_cell(cfg, backbone, task, label, arm, work, seed)
                    print(f"[panel]   test Dice {row['dice']:.3f}, {row['wall_s']:.0f} s", flush=True)
                summary["runs"].append(row)
                summary["n_test_cases"] = row["n_test_cases"]
                summary["n_train"] = finetune_config(cfg, Path("."), task, arm, Path("."))["data"].get("n_train")
                summary["wall_s"] = time.time() - t_start
                out.mkdir(parents=True, exist_ok=True)
                write_json(js, summary)
                (out / f"{stem}.md").write_text(markdown(summary))
    finally:
        torch.set_num_threads(threads_before)
        if not cfg.get("work_dir"):
            shutil.rmtree(work, ignore_errors=True)
    return summary


def parse_args(argv=None) -> tuple[dict, str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="YAML path or a name in benchmarks/configs")
    parser.add_argument("--budget", default=None, help="a key of the config's budgets (reduced, ci)")
    parser.add_argument("--render", action="store_true",
                        help="run nothing: rewrite <output_dir>/<stem>.md from the panel's <stem>.json")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value (YAML value), e.g. steps=60 tasks=[target]")
    args = parser.parse_args(argv)
    cmd = "python benchmarks/learning_panel.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    return load_panel_config(args.config, args.overrides, args.budget), cmd.strip(), args.render


if __name__ == "__main__":
    config, command_line, render_only = parse_args()
    if render_only:
        stem_path = Path(config["output_dir"]) / config["stem"]
        result = json.loads(stem_path.with_suffix(".json").read_text())
        stem_path.with_suffix(".md").write_text(markdown(result))
    else:
        result = main(config, command_line)
    print()
    print(markdown(result))
