"""The learning panel (benchmarks/learning_panel.py, issue 22): the issue's panel and criterion, its table, the
backbone cache key, and -- marked ``panel``, part of the default run -- the guard of the defaults: the panel at its
CI budget, where every adapter alone must beat the frozen backbone (head only) by a margin the defaults reach today
and an adapter that stops learning does not."""

from __future__ import annotations

import json
import time

import pytest

from benchmarks import learning_panel as lp
from peft_tensor.training.config import load_config
from tests._optional import require_template

# The CI panel's adapters alone beat frozen (0.001) by +0.256 (tCURLoRA, r=16, orthonormal core at 2.0, the paper's
# grouping; +0.137 by shape), +0.103 (LoRA-PT r=32), +0.282 (HyPS), +0.280 (PEFT LoRA) at their registry rates (one
# thread, 2-core CPU; 2026-12-07/08).
# Earlier defaults, from a cohort cached at 1e-7 from it (generated
# under another thread count): the backbone differs and the margins were +0.102, +0.125, +0.280, +0.278; at 1/100 of
# the registry rates every adapter is within +0.001 of frozen. Half the smallest margin seen fails an adapter that
# stops learning and leaves room for the tensor methods' spread from one backbone to the next.
CI_MARGIN = 0.05


def _run(arm, dice, backbone="b", task="t", **extra):
    return {**extra, "backbone": backbone, "task": task, "arm": arm, "method": arm, "dice": dice,
            "dice_case_std": 0.01,
            "rates": {"lr": 3e-3, "method_lr": None if arm == "frozen" else 0.3}, "trainable": 10,
            "curve": [[10, dice / 2], [20, dice]], "steps_to_reach": 20, "n_test_cases": 16, "wall_s": 1.0,
            "cpu_s": 1.0}


def test_the_default_panel_is_the_issues():
    cfg = lp.load_panel_config()
    assert len(cfg["backbones"]) >= 3 and cfg["tasks"] == ["target", "target_shift"]
    assert {a["name"] for a in cfg["arms"].values()} == {"tcurlora", "lorapt", "hyps", "lora", "frozen"}
    for label, arm in cfg["arms"].items():
        assert "method_lr" not in arm and "lr" not in arm  # every arm at its registry rate
        assert arm.get("decoder") == "head" or arm["name"] == "frozen"  # the adapter alone
        if arm["name"] in ("tcurlora", "lorapt", "hyps"):
            assert "r" not in arm  # our methods at their recipe defaults (the registry's rank)
    assert cfg["arms"]["lora"]["r"] == 8 and cfg["threads"] == 1
    assert len(cfg["seeds"]) >= 3  # a cell is judged on the mean over several fine-tuning seeds, never on one run
    assert cfg["steps"] == load_config(cfg["finetune"]["config"])["train"]["steps"]  # the recipe's step budget
    crit = {"reference": "lora", "floor": "frozen", "min_ratio": 0.9, "min_margin": 0.1}
    assert {k: cfg["criterion"][k] for k in crit} == crit

    # the `demo` backbone is the demo's pretraining (its seed, cohort, model, optimiser and schedule)
    demo = load_config("demo")
    pre = lp.pretrain_config(cfg, cfg["backbones"]["demo"])
    assert pre["seed"] == demo["seed"] and pre["model"] == demo["model"]
    assert pre["data"]["n_source"] == demo["data"]["n_source"] and pre["data"]["task"] == "source"
    for block in ("optim", "train"):
        assert {k: pre[block][k] for k in demo["pretrain"][block]} == demo["pretrain"][block]
    # and the other two differ from it and from each other
    hashes = {lp.config_hash(lp.pretrain_config(cfg, spec)) for spec in cfg["backbones"].values()}
    assert len(hashes) == len(cfg["backbones"])

    small = lp.load_panel_config(budget="reduced", overrides=["steps=7"])
    assert small["steps"] == 7 and small["budget"] == "reduced" and small["backbones"] == cfg["backbones"]
    with pytest.raises(ValueError, match="budget 'huge' is not in the config's budgets"):
        lp.load_panel_config(budget="huge")
    with pytest.raises(ValueError, match=r"arms must be a mapping, got 'seed=1': e.g. 'arms=\{lora"):
        lp.load_panel_config(overrides=["arms=seed=1"])
    with pytest.raises(ValueError, match="tasks must be a list"):
        lp.load_panel_config(overrides=["tasks=target"])


def test_a_backbone_is_cached_by_what_determines_its_weights():
    cfg = lp.load_panel_config()
    spec = cfg["backbones"]["pretrain_cpu"]
    base = lp.pretrain_config(cfg, spec)
    same = {**base, "output_dir": "elsewhere", "progress": True,
            "data": {**base["data"], "cache_dir": "/tmp/other", "progress": True}}
    assert lp.config_hash(same) == lp.config_hash(base)
    for changed in ({**base, "threads": 2}, {**base, "seed": 1}, {**base, "data": {**base["data"], "n_source": 3}}):
        assert lp.config_hash(changed) != lp.config_hash(base)


def test_steps_to_reach_and_the_criterion_table():
    assert lp.steps_to_reach([[10, 0.05], [20, 0.19], [30, 0.25], [40, 0.20]], 0.9) == 20  # 0.9 x the final 0.20
    assert lp.steps_to_reach([[10, 0.1], [20, 0.0]]) is None and lp.steps_to_reach([]) is None

    crit = {"reference": "lora", "floor": "frozen", "min_ratio": 0.9, "min_margin": 0.1, "reach": 0.9}
    runs = [_run("lora", 0.30), _run("frozen", 0.05), _run("tcurlora", 0.27), _run("lorapt", 0.26),
            _run("lora", 0.25, task="u"), _run("frozen", 0.20, task="u"), _run("tcurlora", 0.29, task="u")]
    v = lp.assess(runs, crit)
    assert v[("b", "t", "tcurlora")]["passed"] is True  # 0.90x LoRA, +0.22
    assert v[("b", "t", "lorapt")]["passed"] is False  # 0.87x LoRA
    assert v[("b", "u", "tcurlora")]["passed"] is False  # 1.16x LoRA but only +0.09 over frozen
    assert v[("b", "t", "lora")]["passed"] is None and v[("b", "t", "frozen")]["passed"] is None

    cfg = {"arms": {a: {"name": a} for a in ("tcurlora", "lorapt", "lora", "frozen")}, "tasks": ["t", "u"],
           "backbones": {"b": {}}, "criterion": crit, "steps": 20, "eval_every": 10, "seed": 0, "threads": 1,
           "finetune": {"config": "finetune_cpu", "overrides": []}}
    summary = {"config": cfg, "runs": runs, "backbones": {}, "n_train": 5, "n_test_cases": 16, "wall_s": 60.0,
               "machine": "x", "load_average_start": [], "command": "python benchmarks/learning_panel.py"}
    lines = lp.markdown(summary).splitlines()
    assert "| b | t | 0.270 ✓ | 0.260 ✗ | 0.300 | 0.050 |" in lines
    assert "| b | u | 0.290 ✗ | — | 0.250 | 0.200 |" in lines
    assert "Cells passing: tcurlora 1 / 2, lorapt 0 / 2." in lines
    # (0.27 + 0.29) / (0.30 + 0.25) over both cells; LoRA-PT ran one cell: 0.26 / 0.30
    assert ("Dice summed over the runs each arm shares with lora (paired by cell and seed), over lora's: "
            "tcurlora 1.018x, lorapt 0.867x (descriptive: the criterion is per cell).") in lines
    assert lp.summed_ratio(runs, "hyps", "lora") is None  # no run
    assert "| b | t | tcurlora | 0.3 / 0.003 | 10 | 0.270 ± 0.010 | 0.90 | +0.220 | 20 | 0.14 0.27 | pass |" in lines
    assert "| b | t | frozen | 0.003 | 10 | 0.050 ± 0.010 | 0.17 | +0.000 | 20 | 0.03 0.05 | floor |" in lines
    assert lines[-1] == "Command: `python benchmarks/learning_panel.py`"


def test_several_seeds_a_cell_is_the_mean_paired_by_seed():
    crit = {"reference": "lora", "floor": "frozen", "min_ratio": 0.9, "min_margin": 0.1, "reach": 0.9}
    runs = [_run("lora", 0.30, seed=0), _run("lora", 0.20, seed=1), _run("frozen", 0.05, seed=0),
            _run("frozen", 0.05, seed=1), _run("tcurlora", 0.20, seed=0), _run("tcurlora", 0.26, seed=1),
            _run("lorapt", 0.40, seed=0)]  # one seed only: judged against the reference's run of that seed
    v = lp.assess(runs, crit)
    assert v[("b", "t", "tcurlora")]["dice"] == pytest.approx(0.23) and v[("b", "t", "tcurlora")]["seeds"] == [0, 1]
    assert v[("b", "t", "tcurlora")]["ratio"] == pytest.approx(0.92)  # 0.23 / 0.25: passes on the mean, not on seed 0
    assert v[("b", "t", "tcurlora")]["passed"] is True
    assert v[("b", "t", "lorapt")]["ratio"] == pytest.approx(0.40 / 0.30)  # paired: seed 0's LoRA only
    # a single-seed summary from before `seeds`: its runs have no seed and count as the panel's
    old = [{k: x for k, x in r.items() if k != "seed"} for r in runs if r.get("seed") == 1]
    assert lp.assess(old, crit, default_seed=1)[("b", "t", "tcurlora")]["ratio"] == pytest.approx(1.3)

    cfg = {"arms": {a: {"name": a} for a in ("tcurlora", "lorapt", "lora", "frozen")}, "tasks": ["t"],
           "backbones": {"b": {}}, "criterion": crit, "steps": 20, "eval_every": 10, "seed": 0, "seeds": [0, 1],
           "threads": 1, "finetune": {"config": "finetune_cpu", "overrides": []}}
    summary = {"config": cfg, "runs": runs, "backbones": {}, "n_train": 5, "n_test_cases": 16, "wall_s": 60.0,
               "machine": "x", "load_average_start": [], "command": None}
    text = lp.markdown(summary)
    lines = text.splitlines()
    assert "fine-tuning seeds 0, 1 (a cell: the mean over its seeds" in text
    assert "| b | t | 0.230 ✓ | 0.400 ✓ (1 of 2) | 0.250 | 0.050 |" in lines
    # per run: against the same seed's reference; the verdict is the cell's
    row = "| b | t | tcurlora | 0 | 0.3 / 0.003 | 10 | 0.200 ± 0.010 | 0.67 | +0.150 | 20 | 0.10 0.20 | pass |"
    assert row in lines
    assert "Runs: 7 of 8;" in text

    # the ratio's bootstrap interval over the seeds: printed beside the verdict, which it does not change
    assert "| b | t | 0.920 [0.67, 1.30] within | — |" in lines  # lorapt: one seed, no interval

    with pytest.raises(ValueError, match="seeds must be a list of distinct integers"):
        lp.load_panel_config(overrides=["seeds=[0, 0]"])
    assert lp.load_panel_config(budget="ci")["seeds"] == [0]
    assert lp.load_panel_config(overrides=["seeds=null", "seed=3"])["seeds"] == [3]


def test_the_ratio_interval_is_the_exact_bootstrap_over_the_seeds():
    """Two seeds: the four resamples (0,0), (0,1), (1,0), (1,1) give ratios 0.2/0.3, 0.46/0.5 twice, 0.26/0.2;
    the 90% interval's ends are the smallest and the largest. Equal per-seed ratios give a point; fewer than two
    shared seeds, none."""
    ratio, low, high = lp.ratio_interval({0: 0.20, 1: 0.26}, {0: 0.30, 1: 0.20})
    assert ratio == pytest.approx(0.46 / 0.50)
    assert (low, high) == (pytest.approx(0.20 / 0.30), pytest.approx(0.26 / 0.20))
    assert lp.ratio_interval({0: 0.1, 1: 0.2, 2: 0.3}, {0: 0.2, 1: 0.4, 2: 0.6}) == pytest.approx((0.5, 0.5, 0.5))
    assert lp.ratio_interval({0: 0.4}, {0: 0.3}) is None and lp.ratio_interval({0: 0.4, 1: 0.2}, {1: 0.3}) is None
    # five seeds: 3,125 resamples; the interval holds the ratio and narrows as the per-seed ratios agree
    mine, ref = {s: 0.2 + 0.01 * s for s in range(5)}, {s: 0.25 - 0.01 * s for s in range(5)}
    r, lo, hi = lp.ratio_interval(mine, ref)
    assert lo < r < hi
    r2, lo2, hi2 = lp.ratio_interval({s: 0.2 + 0.001 * s for s in range(5)}, {s: 0.25 for s in range(5)})
    assert hi2 - lo2 < (hi - lo) / 5
    # more seeds than the exact enumeration takes: a fixed generator, so the table repeats
    # (distinct per-seed ratios: two draws from unseeded generators would differ in their quantiles)
    many, ref_many = {s: 0.2 + 0.013 * s ** 1.5 for s in range(8)}, {s: 0.25 + 0.007 * s for s in range(8)}
    r8, lo8, hi8 = lp.ratio_interval(many, ref_many)
    assert lo8 < r8 < hi8 and lp.ratio_interval(many, ref_many) == (r8, lo8, hi8)


@pytest.mark.panel
def test_every_adapter_alone_beats_frozen_on_the_ci_panel(tmp_path):
    """The defaults' regression guard (issue 22, section 2): one backbone cheap to pretrain, the hippocampus task,
    the tensor methods' and PEFT LoRA's adapters alone at their registry rates, 80 steps."""
    require_template()  # skipped locally without the template packages, a failure in CI
    cfg = lp.load_panel_config(budget="ci", overrides=[f"output_dir={tmp_path / 'out'}",
                                                       f"cache_dir={tmp_path / 'cache'}", "resume=false"])
    t0 = time.time()
    summary = lp.main(cfg)
    wall = time.time() - t0
    dice = {r["arm"]: r["dice"] for r in summary["runs"]}
    assert set(dice) == {"tcurlora", "lorapt", "hyps", "lora", "frozen"}
    margins = {a: d - dice["frozen"] for a, d in dice.items() if a != "frozen"}
    failing = {a: round(m, 3) for a, m in margins.items() if m < CI_MARGIN}
    assert not failing, (f"adapters alone no longer beat frozen ({dice['frozen']:.3f}) by {CI_MARGIN} on the CI "
                         f"panel: margins {failing} (all: {margins}); see {tmp_path / 'out'} and run "
                         "python benchmarks/learning_panel.py --budget ci")
    saved = json.loads((tmp_path / "out" / f"{cfg['stem']}.json").read_text())
    assert len(saved["runs"]) == 5 and all(r["threads"] == 1 and r["curve"] for r in saved["runs"])
    print(f"CI panel: {wall:.0f} s, margins over frozen {margins}")


def test_a_run_is_kept_only_while_the_registry_defaults_it_ran_with_hold(monkeypatch):
    """A resumed panel must not keep a run made before a method's registry default (rank, rate, weight decay)
    changed: the run key holds them. Arms the registry says nothing about keep their key."""
    import dataclasses

    from peft_tensor import registry

    cfg = lp.load_panel_config()
    backbone = {"sha256": "0" * 64, "path": "/nonexistent/backbone"}
    before = {label: lp.run_key(cfg, backbone, "target", arm) for label, arm in cfg["arms"].items()}
    spec = registry.methods()["tcurlora"]
    monkeypatch.setitem(registry._METHODS, "tcurlora", dataclasses.replace(spec, arm_defaults={"r": 4}))
    after = {label: lp.run_key(cfg, backbone, "target", arm) for label, arm in cfg["arms"].items()}
    assert after["tcurlora"] != before["tcurlora"]
    assert {k: v for k, v in after.items() if k != "tcurlora"} == {k: v for k, v in before.items() if k != "tcurlora"}
    monkeypatch.setitem(registry._METHODS, "tcurlora", dataclasses.replace(spec, weight_decay=2e-5))
    assert lp.run_key(cfg, backbone, "target", cfg["arms"]["tcurlora"]) not in (before["tcurlora"],
                                                                                  after["tcurlora"])


def test_machine_line_names_the_cpu_model(monkeypatch, tmp_path):
    """A panel's backbones depend on the CPU (its kernels round differently), so its results name the CPU model."""
    from benchmarks import _common

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\n")
    real_path = _common.Path
    monkeypatch.setattr(_common, "Path", lambda p: info if p == "/proc/cpuinfo" else real_path(p))
    assert _common.machine_line().startswith("AMD EPYC 9B14, ")
    assert _common.machine_info(1)["cpu"] == "AMD EPYC 9B14"
    monkeypatch.setattr(_common, "Path", lambda p: tmp_path / "absent" if p == "/proc/cpuinfo" else real_path(p))
    monkeypatch.setattr(_common.platform, "processor", lambda: "")
    assert _common.machine_line().startswith(_common.platform.machine() + ", ")
