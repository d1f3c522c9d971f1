"""Smoke test of the few-shot accuracy benchmark (benchmarks/fewshot.py): tiny cohort, 1-step pretraining and
fine-tuning, one arm, one seed, two N; checks the JSON / markdown / PNG structure (no accuracy is asserted)."""

from __future__ import annotations

import json

import pytest

from peft_tensor.training.config import load_config
from tests._optional import require_template


def test_benchmark_fewshot_smoke(tmp_path):
    require_template()  # skipped locally without the template packages, a failure in CI
    from benchmarks import fewshot as bench

    cfg = load_config("fewshot_cpu", search=[bench.CONFIG_DIR], overrides=[
        f"output_dir={tmp_path / 'out'}", "stem=smoke", f"work_dir={tmp_path / 'runs'}", "device=cpu", "threads=1",
        f"data.cache_dir={tmp_path / 'cache'}", "data.progress=false", "data.n_source=1", "data.n_train=1",
        "data.n_test=1", "data.size=32", "data.spacing=3.0",
        "pretrain.train.steps=1", "finetune.train.steps=1", "finetune.eval.overlap=0.0",
        "benchmark.n_train=[1,2]", "benchmark.seeds=[0]", "arms=[decoder_only]",
    ])
    summary = bench.main(cfg)

    data = json.loads((tmp_path / "out" / "smoke.json").read_text())
    assert set(data) >= {"data", "backbone", "grid", "machine", "versions", "runs", "aggregate", "wall_s", "config"}
    assert data["grid"]["n_train"] == [1, 2] and data["grid"]["arms"] == ["decoder_only"]
    assert data["grid"]["n_runs"] == 2 and len(data["runs"]) == 2 == len(summary["runs"])
    for run in data["runs"]:
        assert set(run) >= {"arm", "n_train", "seed", "dice", "hd95", "trainable", "train_s", "steps"}
        assert run["steps"] == 1 and run["train_cases"] == 2 * run["n_train"]  # two hemispheres per subject
    cells = data["aggregate"]["decoder_only"]
    assert set(cells) == {"1", "2"}
    for cell in cells.values():
        assert cell["dice"]["n_seeds"] == 1 and 0.0 <= cell["dice"]["mean"] <= 1.0 and cell["dice"]["std"] == 0.0

    text = (tmp_path / "out" / "smoke.md").read_text()
    assert text == bench.markdown(data)
    assert "| Dice | trainable | lr (adapter / rest) | N = 1 | N = 2 |" in text and "| HD95 (mm) |" in text
    assert "Runs completed: 2 of 2" in text
    row = next(line for line in text.splitlines() if line.startswith("| decoder_only |"))
    assert row.split("|")[3].strip() == "0.003"  # the rate it trained at (one rate: no adapter)
    assert data["runs"][0]["rates"] == {"lr": 3e-3, "method_lr": None}
    assert (tmp_path / "out" / "smoke.png").stat().st_size > 1000
    assert (tmp_path / "runs" / "seed0" / "n2" / "decoder_only" / "results.json").is_file()


def test_benchmark_fewshot_workers_shift_task_and_gap(tmp_path):
    """The shifted-task grid's machinery: data.task=target_shift reaches every run, two spawned worker processes give
    the same runs (same Dice, bit for bit) as one process, in the grid's order, and the paired gap table is printed."""
    require_template()
    from benchmarks import fewshot as bench

    def config(stem, workers):
        return load_config("fewshot_shift_cpu", search=[bench.CONFIG_DIR], overrides=[
            f"output_dir={tmp_path / 'out'}", f"stem={stem}", "device=cpu", "threads=1",
            f"data.cache_dir={tmp_path / 'cache'}", "data.progress=false", "data.n_source=1", "data.n_test=1",
            "data.size=32", "data.spacing=3.0", "pretrain.train.steps=1", "finetune.train.steps=2",
            "finetune.eval.overlap=0.0", "benchmark.n_train=[1]", "benchmark.seeds=[0,1]",
            "arms=[full, decoder_only]", f"benchmark.workers={workers}",
        ])

    one = bench.main(config("one", 1))
    two = bench.main(config("two", 2))
    key = [(r["arm"], r["n_train"], r["seed"]) for r in one["runs"]]
    assert key == [("full", 1, 0), ("decoder_only", 1, 0), ("full", 1, 1), ("decoder_only", 1, 1)]
    assert [(r["arm"], r["n_train"], r["seed"]) for r in two["runs"]] == key
    assert [r["dice"] for r in two["runs"]] == [r["dice"] for r in one["runs"]]
    assert "task target_shift" in one["data"] and two["grid"]["workers"] == 2

    text = (tmp_path / "out" / "two.md").read_text()
    assert "Paired gap full - decoder_only" in text
    gaps = bench.paired_gaps(two["runs"], "full", "decoder_only", [1])[1]
    dice = {(r["arm"], r["seed"]): r["dice"] for r in two["runs"]}
    assert gaps == [dice[("full", s)] - dice[("decoder_only", s)] for s in (0, 1)]
    row = next(line for line in text.splitlines() if line.startswith("| 1 | "))
    assert f"{gaps[0]:+.3f} {gaps[1]:+.3f}" in row

    # resume: an earlier summary's runs made with the same settings are kept, only the new arm runs
    saved = json.loads((tmp_path / "out" / "two.json").read_text())
    for run in saved["runs"]:
        run["kept"] = True  # a mark only a kept run carries
    (tmp_path / "out" / "two.json").write_text(json.dumps(saved))
    cfg = config("two", 1)
    cfg["benchmark"]["resume"] = True
    cfg["arms"] = ["full", "decoder_only", "frozen"]
    three = bench.main(cfg)
    assert [(r["arm"], r["seed"]) for r in three["runs"]] == [(a, s) for s in (0, 1)
                                                               for a in ("full", "decoder_only", "frozen")]
    assert [r["dice"] for r in three["runs"] if r["arm"] != "frozen"] == [r["dice"] for r in two["runs"]]
    assert [r.get("kept", False) for r in three["runs"]] == [True, True, False] * 2
    cfg["finetune"]["train"]["steps"] = 3  # another setting: nothing is kept
    assert not any(r.get("kept") for r in bench.main(cfg)["runs"])


def test_benchmark_fewshot_workers_need_a_thread_count():
    from benchmarks import fewshot as bench

    cfg = load_config("fewshot_shift_cpu", search=[bench.CONFIG_DIR], overrides=["threads=auto"])
    with pytest.raises(ValueError, match=r"benchmark.workers=2 .*threads=1"):
        bench.main(cfg)
