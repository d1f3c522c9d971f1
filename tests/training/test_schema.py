"""The config schema (peft_tensor.training.schema): typos refused with the nearest valid key, types checked,
defaults filled in once, in the API and on the command line (one line, non-zero exit, no traceback)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from peft_tensor.training.config import load_config
from peft_tensor.training.schema import SCHEMAS, ConfigError, infer_schema, schema_keys, validate_config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("override, message", [
    ("optim.learning_rate=0.1", "optim.learning_rate: unknown key; did you mean optim.lr?"),
    ("train.stpes=2", "train.stpes: unknown key; did you mean train.steps?"),
    ("train.batch=4", "train.batch: unknown key; did you mean train.batch_size?"),
    ("eval.overlapp=0.1", "eval.overlapp: unknown key; did you mean eval.overlap?"),
    ("seeed=1", "seeed: unknown key; did you mean seed?"),
    ("arm.rr=4", "arm.rr: unknown key for arm tcurlora; did you mean arm.r?"),
    ("data.n_trian=3", "data.n_trian: unknown key for data.kind=embedded; did you mean data.n_train?"),
])
def test_typos_are_refused_with_the_nearest_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("finetune_cpu", [override])
    assert str(err.value) == message and "\n" not in str(err.value)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=two", "train.batch_size: expected int, got str 'two'"),
    ("train.amp=3", "train.amp: expected bool, got int 3"),
    ("optim.lr=[1]", "optim.lr: expected float, got list [1]"),
    ("train.patch=big", "train.patch: expected int or list or null, got str 'big'"),
    ("eval=3", "eval: expected a mapping, got int 3"),
])
def test_wrong_types_are_refused(override, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message) + "$"):
        load_config("finetune_cpu", [override])


def test_numbers_read_as_text_by_yaml_are_floats_and_ints_are_floats():
    cfg = load_config("finetune_cpu", ["optim.lr=1e-4", "optim.weight_decay=0"])  # YAML 1.1: '1e-4' is a string
    assert cfg["optim"]["lr"] == 1e-4 and cfg["optim"]["weight_decay"] == 0


def test_defaults_are_filled_in_once_and_validation_is_idempotent():
    cfg = load_config("finetune_cpu")
    assert cfg["train"]["stop_after"] is None and cfg["train"]["crop_pos"] == 1.0 and cfg["card"] is None
    assert cfg["optim"]["method_lr"] is None and cfg["optim"]["name"] == "adam"
    assert validate_config(cfg, "finetune") == cfg
    sparse = validate_config({"output_dir": "x", "data": {}, "model": {}, "arm": {"name": "full"},
                              "train": {"steps": 1}}, "finetune")
    assert sparse["train"]["batch_size"] == 2 and sparse["eval"] == {"overlap": 0.5, "min_component_voxels": 0}
    with pytest.raises(ConfigError, match="^arm: required key missing"):
        validate_config({"output_dir": "x", "data": {}, "model": {}, "train": {"steps": 1}}, "finetune")
    with pytest.raises(ConfigError, match=r"^train: needs train.steps or train.epochs$"):
        validate_config({"output_dir": "x", "data": {}, "model": {}, "arm": {"name": "full"}}, "finetune")


def test_every_field_has_a_help_line():
    import dataclasses

    seen = set()

    def walk(cls):
        if cls in seen:
            return
        seen.add(cls)
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
            if dataclasses.is_dataclass(f.default_factory if callable(f.default_factory) else None):
                walk(f.default_factory)

    for cls in SCHEMAS.values():
        walk(cls)
    assert schema_keys("finetune")["optim"] == ["name", "lr", "weight_decay", "method_lr", "method_weight_decay",
                                                "momentum", "amsgrad", "poly_power"]


def test_recipe_configs_infer_their_schema():
    assert infer_schema(load_config("finetune_cpu")) == "finetune"
    assert infer_schema(load_config("pretrain_cpu")) == "pretrain"
    assert infer_schema(load_config("demo")) == "demo"
    assert infer_schema(load_config("diagnose_synthetic")) == "diagnose"
    assert infer_schema(load_config("evaluate_run")) == "evaluate_run"
    assert infer_schema({"run": {}, "backbones": {}}) is None  # a benchmark's own config: its reader checks it


def test_cat_shows_the_defaults(capsys):
    from peft_tensor.cli import main

    assert main(["cat", "pretrain_cpu"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert "stop_after" not in (REPO / "recipes" / "configs" / "pretrain_cpu.yaml").read_text()
    assert printed["train"]["stop_after"] is None and printed["train"]["crop_neg"] == 1.0
    assert printed["optim"]["method_lr"] is None and printed["threads"] == "auto"


@pytest.mark.parametrize("argv", [["cat", "finetune_cpu", "optim.learning_rate=0.1"],
                                  ["run", "finetune", "--config", "finetune_cpu", "train.stpes=2"],
                                  ["run", "pretrain", "train.batch_size=two"]])
def test_cli_refuses_a_bad_config_in_one_line(argv, capsys):
    from peft_tensor.cli import main

    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"peft-tensor {argv[0]}: error: ")


def test_recipe_module_refuses_a_typo_in_one_line():
    """``python -m peft_tensor.recipes.finetune`` (what torchrun starts): argparse-style error, exit status 2."""
    proc = subprocess.run([sys.executable, "-m", "peft_tensor.recipes.finetune", "optim.learning_rate=0.1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("error: optim.learning_rate: unknown key; did you mean optim.lr?")
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0
