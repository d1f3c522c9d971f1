"""Recipes and their machinery: metrics, atomic checkpoints, exact resume, DDP equivalence, CLI, demo smoke test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from peft_tensor.training import (Checkpointer, apply_arm, case_metrics, load_config, param_counts,
                                  remove_small_components)
from tests._models import tiny_unetr
from tests._recipe_fixtures import TINY_MODEL, brats_dataset, msd_dataset, pairs_dataset

REPO = Path(__file__).resolve().parents[2]


ARM = "tcurlora"


# ---------------------------------------------------------------- metrics
def test_hd95_is_the_95th_percentile_not_the_maximum():
    from monai.metrics import HausdorffDistanceMetric

    truth = np.zeros((40, 40, 40), bool)
    truth[10:30, 10:30, 10:30] = True
    pred = truth.copy()
    pred[37, 37, 37] = True  # one far outlier voxel: dominates the maximum, not the 95th percentile
    m = case_metrics(pred, truth, spacing=(2.0, 2.0, 2.0))
    onehot = lambda a: torch.stack([torch.from_numpy(~a), torch.from_numpy(a)]).float()[None]  # noqa: E731
    hd_max = float(HausdorffDistanceMetric(include_background=False)(onehot(pred), onehot(truth), spacing=2.0))
    assert hd_max == pytest.approx(2.0 * np.sqrt(3 * 8**2))
    assert m["hd95"] == pytest.approx(0.0)
    n = truth.sum()
    assert m["dice"] == pytest.approx(2 * n / (2 * n + 1))
    assert m["jaccard"] == pytest.approx(n / (n + 1))
    assert m["volume_ml"] == pytest.approx((n + 1) * 8 / 1000)

    # shifted prediction: HD95 in mm equals the shift; small-component removal is reported separately
    shifted = np.roll(truth, 2, axis=0)
    shifted[0:2, 0:2, 0:2] = True
    m2 = case_metrics(shifted, truth, spacing=(1.0, 1.0, 1.0), min_component_voxels=20)
    assert m2["hd95_cc"] == pytest.approx(2.0)
    assert m2["dice_cc"] > m2["dice"] and "volume_ml_cc" in m2
    assert remove_small_components(shifted, 20).sum() == truth.sum()
    assert np.isnan(case_metrics(np.zeros_like(truth), truth)["hd95"])  # undefined, not 0 or inf


# ---------------------------------------------------------------- arms
def test_arms_train_what_they_say():
    counts = {}
    for arm in ("full", "decoder_only", "frozen", "lora", ARM):
        model = apply_arm(tiny_unetr(), {"name": arm, "r": 4} if arm in ("lora", ARM) else arm, TINY_MODEL)
        counts[arm] = param_counts(model)["trainable"]
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        if arm == "frozen":
            assert all("out.conv.conv" in n for n in names)
        if arm == "decoder_only":
            assert not any(n.startswith("vit.") for n in names) and any("decoder2" in n for n in names)
    assert counts["frozen"] < counts["decoder_only"] < counts[ARM] < counts["full"]


# ---------------------------------------------------------------- checkpoints
def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    ckpt = Checkpointer(tmp_path, every=1)
    ckpt.save(1, model)
    before = ckpt.path.read_bytes()

    def broken_save(tensors, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError):
        ckpt.save(2, model)
    assert ckpt.path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.safetensors"]
    monkeypatch.undo()
    step, _ = Checkpointer(tmp_path).resume(torch.nn.Linear(3, 2))
    assert step == 1


def _finetune_cfg(data_root: Path, out: Path, **train) -> dict:
    cfg = load_config("finetune_cpu")
    # a fixed thread count: threads=auto drops to 1 on a busy machine, and runs that split their reductions over
    # other thread counts are not the same operations (the resume test compares them bit for bit)
    cfg.update({"output_dir": str(out), "progress": False, "device": "cpu", "threads": torch.get_num_threads()})
    cfg["data"] = {"kind": "pairs", "root": str(data_root), "foreground": [17, 53]}
    cfg["model"] = dict(TINY_MODEL)
    cfg["arm"] = {"name": ARM, "r": 4}
    cfg["train"].update({"steps": 6, "batch_size": 2, "checkpoint_every": 2, "val_every": 0, **train})
    cfg["eval"] = {"overlap": 0.0}
    return cfg


def _trained_state(out: Path) -> dict:
    from safetensors.torch import load_file  # the checkpoint is safetensors, its model tensors model/<name>

    tensors = load_file(out / "checkpoint" / "checkpoint.safetensors")
    return {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}


def test_resume_after_interruption_is_exact(tmp_path):
    from peft_tensor.recipes import finetune

    data = pairs_dataset(tmp_path / "data", n=4)
    straight = finetune.main(_finetune_cfg(data, tmp_path / "a"))
    interrupted = finetune.main(_finetune_cfg(data, tmp_path / "b", stop_after=3))
    assert interrupted == {"interrupted_at": 3}  # checkpoint at step 2; step 3 is lost and redone
    resumed = finetune.main(_finetune_cfg(data, tmp_path / "b"))
    a, b = _trained_state(tmp_path / "a"), _trained_state(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["test"]["dice"]["mean"] == straight["test"]["dice"]["mean"]
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(6))
    for f in ("results.json", "curves.png", "overlay_best.png", "overlay_worst.png", "test_cases.csv"):
        assert (tmp_path / "b" / f).is_file(), f
    assert (tmp_path / "b" / "adapter" / "README.md").read_text().count("Fine-tuning run") == 1


def test_finetune_multiclass_msd_reports_every_class_and_evaluate_reproduces_it(tmp_path):
    """MSD Task04 layout (anterior / posterior kept apart): a 3-channel network, per-class results and overlays."""
    import csv

    from peft_tensor.recipes import evaluate_run, finetune

    root = msd_dataset(tmp_path / "Task04_Hippocampus", n=5)
    cfg = _finetune_cfg(root, tmp_path / "run", steps=3, checkpoint_every=0)
    cfg["data"] = {"kind": "msd", "root": str(root), "fractions": {"train": 0.6, "test": 0.4}}
    with pytest.raises(ValueError, match="model.out_channels is 2, but the data is a 2-class softmax"):
        finetune.main({**cfg, "model": {**cfg["model"], "out_channels": 2}})
    result = finetune.main(cfg)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["classes"] == result["classes"] == ["anterior", "posterior"] and saved["task_type"] == "multiclass"
    assert set(saved["test_per_class"]) == {"anterior", "posterior"}
    for name in ("anterior", "posterior"):
        assert {"dice", "hd95", "jaccard", "volume_ml"} <= set(saved["test_per_class"][name])
        assert saved["test_per_class"][name]["dice"]["n"] == 2
    means = [saved["test_per_class"][c]["dice"]["mean"] for c in ("anterior", "posterior")]
    assert saved["test"]["dice"]["n"] == 2 and saved["test"]["dice"]["mean"] == pytest.approx(np.mean(means))
    with open(tmp_path / "run" / "test_cases.csv") as f:
        header = next(csv.reader(f))
    assert {"dice", "dice:anterior", "hd95:posterior", "fg_volume_ml"} <= set(header)
    for f in ("overlay_best.png", "overlay_worst.png", "curves.png"):
        assert (tmp_path / "run" / f).is_file(), f

    summary = evaluate_run.main({"run_dir": str(tmp_path / "run"), "split": "test", "progress": False})
    assert summary["classes"] == ["anterior", "posterior"]
    assert summary["metrics"]["dice"]["mean"] == pytest.approx(saved["test"]["dice"]["mean"], abs=1e-6)
    assert summary["per_class"]["posterior"]["dice"]["mean"] == pytest.approx(means[1], abs=1e-6)
    with open(tmp_path / "run" / "eval_test" / "volumes.csv") as f:
        assert next(csv.reader(f)) == ["id", "volume_ml", "volume_ml:anterior", "volume_ml:posterior"]
    with pytest.raises(ValueError, match=r"trained on classes \['anterior', 'posterior'\].*data.task_type"):
        evaluate_run.main({"run_dir": str(tmp_path / "run"), "progress": False,
                           "data": {**cfg["data"], "task_type": "binary"}})


def test_finetune_multilabel_brats_regions_from_a_persistent_cache_with_a_worker(tmp_path):
    from peft_tensor.recipes import finetune

    root = brats_dataset(tmp_path / "brats", n=3)
    cfg = _finetune_cfg(root, tmp_path / "run", steps=2, checkpoint_every=0)
    cfg["data"] = {"kind": "brats", "root": str(root), "task_type": "multilabel",
                   "loader": {"dataset": "persistent", "num_workers": 1}}
    cfg["train"]["loss"] = "dicece"
    result = finetune.main(cfg)
    assert result["classes"] == ["tumour_core", "whole_tumour", "enhancing_tumour"]
    assert result["task_type"] == "multilabel" and set(result["test_per_class"]) == set(result["classes"])
    assert np.isfinite(result["test"]["dice"]["mean"])
    assert len(list((tmp_path / "run" / "cache").glob("*.pt"))) == result["n_train"]  # the preprocessed cases


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    """torchrun, 2 CPU processes (gloo) x batch 1 == 1 process x batch 2. SGD, so that rounding differences in the
    gradient all-reduce are not amplified into lr-sized steps by Adam's normalisation of near-zero gradients."""
    from peft_tensor.recipes import finetune

    data = pairs_dataset(tmp_path / "data", n=4)
    cfgs = {}
    for name in ("one", "two"):
        cfgs[name] = _finetune_cfg(data, tmp_path / name, steps=3, checkpoint_every=3)
        cfgs[name]["optim"] = {"name": "sgd", "lr": 0.1, "weight_decay": 0.0}
    finetune.main(cfgs["one"])
    cfg_path = tmp_path / "two.json"
    cfg_path.write_text(json.dumps(cfgs["two"]))  # JSON is YAML
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "peft_tensor.recipes.finetune", "--config", str(cfg_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _trained_state(tmp_path / "one"), _trained_state(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
              for n in ("one", "two")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


# ---------------------------------------------------------------- CLI and demo
def test_cli_list_copy_run(tmp_path, capsys):
    from peft_tensor.cli import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "finetune" in out and "finetune_unetr_tcurlora" in out and "demo" in out
    assert main(["copy", "finetune", str(tmp_path)]) == 0
    assert (tmp_path / "finetune.py").read_text().startswith('"""Few-shot fine-tuning')
    assert main(["copy", "finetune_cpu", str(tmp_path / "my.yaml")]) == 0
    assert main(["run", "diagnose", "--config", "diagnose_synthetic", f"output_dir={tmp_path / 'dx'}"]) == 0
    res = json.loads((tmp_path / "dx" / "diagnosis.json").read_text())
    assert res["synthetic"] and res["tasks"]["AD vs CN"]["accuracy"] > 0.8
    papers = ("finetune_unetr_tcurlora", "finetune_unetr_lorapt", "finetune_swinunetr_hyps", "pretrain_unetr_brats")
    for name in papers:
        cfg = load_config(name)
        assert cfg["optim"]["lr"] == 1e-3 and cfg["optim"]["weight_decay"] == 2e-5 and cfg["optim"]["amsgrad"]


def test_demo_pipeline_smoke_tiny(tmp_path):
    from tests._optional import require_template

    require_template()  # skipped locally without the template packages, a failure in CI
    from peft_tensor.recipes import demo

    cfg = load_config("demo", [
        f"output_dir={tmp_path / 'demo'}", "progress=false", "device=cpu",
        f"data.cache_dir={tmp_path / 'cache'}", "data.progress=false", "data.n_source=2", "data.n_train=2",
        "data.n_test=1", "data.size=32", "data.spacing=3.0",
        "pretrain.train.steps=2", "finetune.train.steps=2", "finetune.eval.overlap=0.0",
    ])
    cfg["arms"] = [{"name": ARM, "r": 2}, "frozen"]
    result = demo.main(cfg)
    assert set(result["results"]) == {ARM, "frozen"} and not result["pretrain_reused"]
    out = tmp_path / "demo"
    assert "| arm |" in (out / "demo_results.md").read_text()
    assert (out / ARM / "adapter" / "adapter_config.json").is_file()
    assert (out / "frozen" / "adapter" / "trainable.safetensors").is_file()
    from peft_tensor.hub import adapter_info, format_info

    info = format_info(adapter_info(out / ARM / "adapter"))  # ready to share as written: base network recorded
    assert "not recorded" not in info and "UNETR" in info
    assert "Model Card for Model ID" not in (out / ARM / "adapter" / "README.md").read_text()
    again = demo.main(cfg)  # the pretrained backbone is reused from the cache
    assert again["pretrain_reused"]
    assert again["results"][ARM]["test"]["dice"]["mean"] == result["results"][ARM]["test"]["dice"]["mean"]

    # evaluate recipe on the demo's fine-tuned run reloads the adapter and reproduces the test Dice
    from peft_tensor.recipes import evaluate_run

    summary = evaluate_run.main({"run_dir": str(out / ARM), "split": "test", "progress": False})
    dice = result["results"][ARM]["test"]["dice"]["mean"]
    assert summary["metrics"]["dice"]["mean"] == pytest.approx(dice, abs=1e-6)
    assert (out / ARM / "eval_test" / "volumes.csv").is_file()


def test_demo_fine_tunes_on_the_configured_target_task_and_shares_the_backbone_across_tasks(tmp_path, monkeypatch):
    """The few-shot grid on the shifted task goes through the demo's fine-tuning: data.task picks the target task
    (target_shift reaches the run, source is refused), and the cached pretraining is keyed without the fine-tuning task
    or its acquisition shift (pretraining always reads the source task in T1), so both tasks share one backbone."""
    from peft_tensor.recipes import demo

    cfg = load_config("demo", [f"data.cache_dir={tmp_path}"])
    shifted = {**cfg, "data": {**cfg["data"], "task": "target_shift", "shift": {"contrast": "flair"}}}
    assert demo._backbone_dir(shifted) == demo._backbone_dir(cfg)
    assert demo._backbone_dir({**cfg, "data": {**cfg["data"], "n_source": 3}}) != demo._backbone_dir(cfg)
    with pytest.raises(ValueError, match="data.task=source is the pretraining task"):
        demo.finetune_arm(cfg, "frozen", tmp_path / "backbone", tmp_path / "run",
                          data={**cfg["data"], "task": "source"})

    seen = {}
    monkeypatch.setattr(demo.finetune, "main", lambda ft_cfg: seen.setdefault("data", ft_cfg["data"]))
    demo.finetune_arm(shifted, "frozen", tmp_path / "backbone", tmp_path / "run")
    assert seen["data"]["task"] == "target_shift" and seen["data"]["shift"] == {"contrast": "flair"}
    seen.clear()
    demo.finetune_arm(cfg, "frozen", tmp_path / "backbone", tmp_path / "run")
    assert seen["data"]["task"] == "target"
