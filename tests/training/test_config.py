"""Every YAML config (packaged recipe configs and benchmark configs) loads, resolves and builds what it names; the
config reader's inheritance and overrides; ``peft-tensor cat`` and the resolved ``peft-tensor copy``."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from peft_tensor.training.arms import PEFT_ARMS, canonical_arm, peft_config
from peft_tensor.training.config import CONFIG_DIR, config_names, load_config, total_steps
from peft_tensor.training.models import model_kwargs

REPO = Path(__file__).resolve().parents[2]
BENCH_DIR = REPO / "benchmarks" / "configs"
RECIPE_CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
BENCH_CONFIGS = sorted(p.stem for p in BENCH_DIR.glob("*.yaml"))


def _check_arm(arm, model_cfg: dict) -> None:
    arm_cfg = {"name": arm} if isinstance(arm, str) else dict(arm)
    if arm_cfg["name"] == "floor":  # the efficiency benchmark's own arm
        return
    name = canonical_arm(arm_cfg["name"])
    if name in PEFT_ARMS:
        peft_config(name, arm_cfg, model_cfg)  # the config class validates its fields


def _check_data(data: dict, model_cfg: dict) -> None:
    """The data section: a known layout (or a dotted path), a valid task whose output channels the model has (when
    the config names them), valid preprocessing and loader settings."""
    from peft_tensor.data import LoaderSettings, Preprocess, make_task
    from peft_tensor.data.loaders import LOADERS

    assert data["kind"] in LOADERS or "." in str(data["kind"])
    Preprocess.from_config(data)
    LoaderSettings.from_config(data)
    if data.get("task_type") or data.get("classes"):
        task = make_task(data.get("task_type"), data.get("classes"), default_type="binary",
                         foreground=data.get("foreground"))
        if model_cfg.get("out_channels") is not None:
            assert int(model_cfg["out_channels"]) == task.out_channels, (model_cfg["out_channels"], task)


def _check_training(cfg: dict) -> None:
    model_kwargs(cfg["model"])
    assert {"lr", "weight_decay"} <= set(cfg["optim"])
    assert total_steps(cfg["train"], 10) > 0
    _check_data(cfg["data"], cfg["model"])


def test_the_packaged_configs_are_the_recipe_configs():
    assert {"pretrain_cpu", "finetune_cpu", "demo"} <= set(RECIPE_CONFIGS)
    assert set(config_names()) == set(RECIPE_CONFIGS)
    assert not any(name.startswith("benchmark") for name in RECIPE_CONFIGS), "benchmark configs live in benchmarks/"


@pytest.mark.parametrize("name", RECIPE_CONFIGS + BENCH_CONFIGS)
def test_config_loads_and_validates(name):
    path = (CONFIG_DIR if name in RECIPE_CONFIGS else BENCH_DIR) / f"{name}.yaml"
    assert path.read_text().startswith("# "), "the first line is the description `peft-tensor list` shows"
    cfg = load_config(name, search=[BENCH_DIR])
    assert "base" not in cfg
    if name.startswith(("pretrain", "finetune")):
        _check_training(cfg)
        if name.startswith("finetune"):
            _check_arm(cfg["arm"], cfg["model"])
    elif name == "demo" or name.startswith("fewshot"):  # the demo and the few-shot benchmark built on it
        model_kwargs(cfg["model"])
        _check_data(cfg["data"], cfg["model"])
        for section in ("pretrain", "finetune"):
            assert total_steps(cfg[section]["train"], 10) > 0 and cfg[section]["optim"]["lr"] > 0
        for arm in cfg["arms"]:
            _check_arm(arm, cfg["model"])
    elif name.startswith("efficiency"):
        for bname in cfg["run"]["backbones"]:
            spec = cfg["backbones"][bname]
            model_kwargs({**spec["model"], "img_size": cfg["run"]["size"]})
            assert "floor" in [a["name"] for a in spec["arms"].values()]
            for arm in spec["arms"].values():
                _check_arm({k: v for k, v in arm.items() if k != "label"}, spec["model"])
    elif name.startswith("vit_blocks"):  # UNETR-B's transformer blocks alone (benchmarks/vit_blocks.py)
        assert {cfg["floor_arm"], cfg["reference"]} <= set(cfg["arms"]) and cfg["run"]["steps"] > 0
        for arm in cfg["arms"].values():
            _check_arm({k: v for k, v in arm.items() if k != "label"}, {"name": "unetr"})
    elif name.startswith("loader"):  # benchmarks/loader_throughput.py
        from peft_tensor.data import LoaderSettings, Preprocess

        Preprocess(**cfg["preprocess"])
        for dataset in cfg["datasets"]:
            for workers in cfg["workers"]:
                LoaderSettings(dataset=dataset, num_workers=workers, cache_rate=cfg.get("cache_rate", 1.0))
        assert cfg["synthetic"]["n_cases"] > 0 and all(p <= s for p, s in zip(cfg["patch"], cfg["synthetic"]["size"]))
        for spec in cfg["models"].values():
            model_kwargs(spec["model"])
    elif name.startswith("learning_panel"):  # benchmarks/learning_panel.py: every backbone's pretraining, the arms
        from benchmarks.learning_panel import pretrain_config

        assert cfg["criterion"]["reference"] in cfg["arms"] and cfg["criterion"]["floor"] in cfg["arms"]
        for spec in cfg["backbones"].values():
            _check_training(pretrain_config(cfg, spec))
        finetune = load_config(cfg["finetune"]["config"], cfg["finetune"]["overrides"], search=[BENCH_DIR])
        _check_training(finetune)
        for arm in cfg["arms"].values():
            _check_arm(arm, finetune["model"])
    elif name == "evaluate_run":
        assert {"run_dir", "split", "eval"} <= set(cfg)
    elif name.startswith("diagnose"):
        assert {"features", "tasks", "folds"} <= set(cfg)
    else:
        pytest.fail(f"config {name} has no validation rule here: add one")


def test_base_inheritance_and_overrides(tmp_path):
    (tmp_path / "parent.yaml").write_text("# parent\na: 1\nnested: {x: 1, y: 2}\nlist: [1, 2]\n")
    (tmp_path / "child.yaml").write_text("# child\nbase: parent\nnested: {y: 3}\nlist: [9]\n")
    cfg = load_config(tmp_path / "child.yaml", ["nested.z=4", "a=[1, 2]"])
    assert cfg == {"a": [1, 2], "nested": {"x": 1, "y": 3, "z": 4}, "list": [9]}
    with pytest.raises(FileNotFoundError, match="known:"):
        load_config("no_such_config")
    with pytest.raises(ValueError, match="key=value"):
        load_config("demo", ["no_equals_sign"])


def test_cli_cat_and_resolved_copy(tmp_path, capsys):
    from peft_tensor.cli import main

    assert main(["cat", "finetune_unetr_tcurlora", "train.epochs=3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == load_config("finetune_unetr_tcurlora", ["train.epochs=3"])
    assert printed["arm"]["grouping"] == "paper" and printed["optim"]["lr"] == 1e-3  # from its base

    assert main(["copy", "finetune_unetr_tcurlora", str(tmp_path)]) == 0
    copied = tmp_path / "finetune_unetr_tcurlora.yaml"
    assert copied.read_text().startswith("# tCURLoRA")
    assert yaml.safe_load(copied.read_text()) == load_config("finetune_unetr_tcurlora")  # standalone: no base
    assert main(["copy", "pretrain_cpu", str(tmp_path)]) == 0  # no base: copied as written, comments kept
    assert (tmp_path / "pretrain_cpu.yaml").read_text() == (CONFIG_DIR / "pretrain_cpu.yaml").read_text()
