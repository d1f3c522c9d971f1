"""Reproducible runs: the same config and seed on the same machine give the same weights, and the thread count a run
used (``threads: auto`` resolved) is part of its saved config, so that rerunning that config repeats it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from peft_tensor.training import load_config
from tests._recipe_fixtures import TINY_MODEL, pairs_dataset


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _load(monkeypatch, one_minute: float) -> None:
    """The machine's 1-minute load average as ``threads: auto`` will read it."""
    monkeypatch.setattr(os, "getloadavg", lambda: (one_minute, one_minute, one_minute))


def _pretrain_cfg(data: Path, out: Path) -> dict:
    cfg = load_config("pretrain_cpu")  # threads: auto, as the recipe ships it
    cfg.update({"output_dir": str(out), "progress": False, "device": "cpu"})
    # a DataLoader worker crops and augments (MONAI random transforms): seeded per sample, not per process
    cfg["data"] = {"kind": "pairs", "root": str(data), "foreground": [17, 53], "loader": {"num_workers": 1}}
    cfg["model"] = dict(TINY_MODEL)
    cfg["train"].update({"steps": 3, "batch_size": 2, "checkpoint_every": 3})
    return cfg


def _tensors(run: Path) -> dict:
    """Every tensor of every safetensors file the run saved (the backbone, the checkpoint with the optimiser)."""
    from safetensors.torch import load_file

    files = sorted(run.rglob("*.safetensors"))
    assert {f.relative_to(run).as_posix() for f in files} == {"backbone/model.safetensors",
                                                              "checkpoint/checkpoint.safetensors"}
    return {f"{f.relative_to(run)}:{k}": v for f in files for k, v in load_file(f).items()}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def test_pretraining_twice_gives_the_same_weights_and_its_saved_config_repeats_the_threads(tmp_path, monkeypatch,
                                                                                           keep_threads):
    from peft_tensor.recipes import pretrain

    data = pairs_dataset(tmp_path / "data", n=4)
    _load(monkeypatch, float(os.cpu_count() or 1))  # busy: auto picks 1 thread
    for name in ("a", "b"):
        pretrain.main(_pretrain_cfg(data, tmp_path / name))
    _assert_same(_tensors(tmp_path / "a"), _tensors(tmp_path / "b"))
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    assert saved["threads"] == 1  # the count auto chose, not "auto"

    # rerun the saved config on an idle machine, where auto would choose torch's default count: it keeps 1 thread
    _load(monkeypatch, 0.0)
    torch.set_num_threads(2)
    rerun = load_config(tmp_path / "a" / "config.json", [f"output_dir={tmp_path / 'c'}"], schema="pretrain")
    pretrain.main(rerun)
    assert torch.get_num_threads() == 1
    _assert_same(_tensors(tmp_path / "a"), _tensors(tmp_path / "c"))
    again = json.loads((tmp_path / "c" / "config.json").read_text())
    assert {**again, "output_dir": None} == {**saved, "output_dir": None}


def test_threads_resolve_to_the_count_in_use(monkeypatch, keep_threads):
    """``auto``: 1 thread on a busy machine, the process's default on an idle one (not whatever an earlier run of
    the same process left); every setting returns the count that the run then records."""
    from peft_tensor.training import loop
    from peft_tensor.training.loop import configure_threads

    _load(monkeypatch, 1e9)
    assert configure_threads("auto") == 1 == torch.get_num_threads()
    _load(monkeypatch, 0.0)
    assert configure_threads("auto") == loop._STARTUP_THREADS == torch.get_num_threads()
    assert configure_threads(None) == torch.get_num_threads()  # null: torch's current setting, reported as a count
    assert configure_threads(1) == 1
    with pytest.raises(ValueError, match="threads must be auto, null or a thread count"):
        configure_threads("many")
