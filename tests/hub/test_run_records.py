"""Run records (``peft_tensor.json``) name the base weights relative to the run folder where they lie inside it,
with their sha256 either way: a moved or copied run folder loads, another file at the recorded path is refused by
hash, older records (absolute path, no hash) still load, and a record cannot point a reader outside its run folder
(issue 21, item 7)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from peft_tensor.cli import main
from peft_tensor.hub import load_pretrained
from peft_tensor.hub.provenance import WeightsHashError, WeightsNotFoundError, sha256_file
from peft_tensor.networks import NetworkLoadError, load_network
from peft_tensor.training import apply_arm
from peft_tensor.training.models import build_model
from peft_tensor.training.outputs import save_outputs

from tests._recipe_fixtures import TINY_MODEL


def _x():
    return torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finetune run folder as the recipe leaves it (no pretrained source: <run>/base/model.safetensors is written)
    and the trained model's output on a fixed input."""
    root = tmp_path_factory.mktemp("records")
    torch.manual_seed(1)
    model = apply_arm(build_model(TINY_MODEL), {"name": "lora", "r": 2, "init_lora_weights": False}, TINY_MODEL)
    model.eval()
    save_outputs(model, root / "run" / "adapter", arm="lora", model_cfg={**TINY_MODEL, "pretrained": None})
    with torch.no_grad():
        expected = model(_x())
    return root / "run", expected


def _record(adapter):
    return json.loads((adapter / "peft_tensor.json").read_text())


def _copy_run(run_dir, dest):
    shutil.copytree(run_dir, dest)
    return dest


def test_record_is_relative_with_hash_and_a_moved_run_folder_loads(run, tmp_path):
    run_dir, expected = run
    weights = _record(run_dir / "adapter")["base_network"]["weights"]
    assert weights["path"] == "../base/model.safetensors"
    assert weights["sha256"] == sha256_file(run_dir / "base" / "model.safetensors")
    moved = _copy_run(run_dir, tmp_path / "elsewhere" / "colleague_copy")
    shutil.move(str(moved), str(tmp_path / "moved"))  # and moved once more: no absolute path survives anywhere
    with torch.no_grad():
        assert torch.equal(load_pretrained(tmp_path / "moved" / "adapter")(_x()), expected)
    net, report = load_network(tmp_path / "moved" / "adapter")  # the base network alone, from the same record
    assert report.complete and report.weights == str((tmp_path / "moved" / "base" / "model.safetensors").resolve())


def test_another_file_at_the_recorded_path_is_refused_by_hash(run, tmp_path, capsys):
    run_dir, _ = run
    copy = _copy_run(run_dir, tmp_path / "run")
    from safetensors.torch import load_file, save_file

    state = load_file(str(copy / "base" / "model.safetensors"))
    state = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, str(copy / "base" / "model.safetensors"))  # same name, same shapes, other weights
    with pytest.raises(WeightsHashError, match="are not the weights the adapter was trained on") as err:
        load_pretrained(copy / "adapter")
    assert "Put the original file back" in str(err.value)
    with pytest.raises(NetworkLoadError, match="not the weights the adapter was trained on"):
        load_network(copy / "adapter")
    assert main(["load", str(copy / "adapter")]) == 1
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "not the weights the adapter was trained on" in line
    # the user who knows better can still say so
    load_pretrained(copy / "adapter", check_base_hash=False)


def test_older_records_with_absolute_paths_still_load(run, tmp_path):
    """A record of an older version: absolute path, with or without sha256. Where the run folder has moved, the
    file of the same name inside it is taken -- only with a matching hash."""
    run_dir, expected = run
    copy = _copy_run(run_dir, tmp_path / "run")
    record = _record(copy / "adapter")
    weights = record["base_network"]["weights"]
    absolute = str((copy / "base" / "model.safetensors").resolve())
    for old in ({**weights, "path": absolute}, {"path": absolute}):  # the second: no hash at all
        record["base_network"]["weights"] = old
        (copy / "adapter" / "peft_tensor.json").write_text(json.dumps(record))
        with torch.no_grad():
            assert torch.equal(load_pretrained(copy / "adapter")(_x()), expected)
    record["base_network"]["weights"] = {**weights, "path": str(tmp_path / "gone" / "base" / "model.safetensors")}
    (copy / "adapter" / "peft_tensor.json").write_text(json.dumps(record))
    with torch.no_grad():
        assert torch.equal(load_pretrained(copy / "adapter")(_x()), expected)  # found in <run>/base by its hash
    record["base_network"]["weights"] = {"path": str(tmp_path / "gone" / "base" / "model.safetensors")}
    (copy / "adapter" / "peft_tensor.json").write_text(json.dumps(record))
    with pytest.raises(WeightsNotFoundError, match="are not on this machine"):
        load_pretrained(copy / "adapter")  # no hash: nothing else is taken in its place


def test_a_record_cannot_point_outside_its_run_folder(run, tmp_path):
    """A relative path that climbs out of the run folder, or a symbolic link in it to a file elsewhere, is refused
    before the file is opened -- even a file with the recorded hash."""
    run_dir, _ = run
    copy = _copy_run(run_dir, tmp_path / "runs" / "run")
    outside = tmp_path / "outside.safetensors"
    shutil.copyfile(copy / "base" / "model.safetensors", outside)
    record = _record(copy / "adapter")
    record["base_network"]["weights"]["path"] = "../../../outside.safetensors"
    (copy / "adapter" / "peft_tensor.json").write_text(json.dumps(record))
    with pytest.raises(WeightsNotFoundError, match="outside the run folder"):
        load_pretrained(copy / "adapter")
    with pytest.raises(NetworkLoadError, match="outside the run folder"):
        load_network(copy / "adapter")
    record["base_network"]["weights"]["path"] = "../base/model.safetensors"
    (copy / "adapter" / "peft_tensor.json").write_text(json.dumps(record))
    os.remove(copy / "base" / "model.safetensors")
    os.symlink(outside, copy / "base" / "model.safetensors")
    with pytest.raises(WeightsNotFoundError, match="outside the run folder"):
        load_pretrained(copy / "adapter")
