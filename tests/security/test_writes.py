"""Writes that leave the folder or break it: symlinks planted in an adapter / run folder, kills mid-save.

* ``push`` uploads regular files inside the adapter folder only; a symlink is refused before anything is sent;
* ``save_pretrained`` lets PEFT write into a fresh folder beside the destination, then moves each file into place:
  never through a planted symlink, and a failure mid-save leaves the previous files whole;
* plots (``curves.png``, overlays) and ``peft-tensor copy`` go through the atomic writer, which replaces a symlink at
  the destination instead of writing through it (and never takes the permissions of its target).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import HfApi

from peft_tensor._atomic import atomic_write, atomic_write_text
from peft_tensor.cli import main
from peft_tensor.errors import PeftTensorError, UnsafePathError

SECRET = "-----BEGIN PRIVATE KEY----- not for the Hub\n"


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def outside(tmp_path):
    """A folder outside the one written to, holding a file that must never be read out or written."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "private_key.txt").write_text(SECRET)
    return d


# ------------------------------------------------------------------------------------------------- adapter fixtures
@pytest.fixture(scope="module")
def lora_model():
    torch = pytest.importorskip("torch")
    from peft import LoraConfig, get_peft_model

    from peft_tensor.hub import record_network
    from tests._models import tiny_unetr

    kwargs = dict(in_channels=1, out_channels=2, img_size=[32, 32, 32], feature_size=8, hidden_size=96, mlp_dim=192,
                  num_heads=4, proj_type="conv", norm_name="instance", dropout_rate=0.0)
    base = record_network(tiny_unetr(), "monai.networks.nets.UNETR", **kwargs)
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["attn.qkv"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(generator=torch.Generator().manual_seed(0))
    return model


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory, lora_model):
    from peft_tensor.hub import save_pretrained

    d = tmp_path_factory.mktemp("template") / "adapter"
    save_pretrained(lora_model, d, training_data="toy", license="apache-2.0")
    return d


@pytest.fixture
def adapter(tmp_path, saved_adapter):
    d = tmp_path / "adapter"
    shutil.copytree(saved_adapter, d)
    return d


@pytest.fixture
def recorded_uploads(monkeypatch):
    """HfApi's repo creation and commit, recorded instead of sent (what would have been uploaded)."""
    calls = []

    class Info:
        oid = "0" * 40
        commit_url = "http://hub.invalid/commit"

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id))

    def create_commit(self, repo_id, operations, **kwargs):
        uploaded = {}
        for op in operations:
            src = op.path_or_fileobj
            if isinstance(src, (str, Path)):
                uploaded[op.path_in_repo] = Path(src).read_bytes()
            elif isinstance(src, bytes):
                uploaded[op.path_in_repo] = src
            else:
                src.seek(0)
                uploaded[op.path_in_repo] = src.read()
        calls.append(("create_commit", repo_id, uploaded))
        return Info()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return calls


# ------------------------------------------------------------------------------------------------------------ push
def test_push_uploads_the_regular_files_of_the_folder(adapter, recorded_uploads):
    """Control for the refusals below: a clean folder goes up whole through the recorder."""
    from peft_tensor.hub import push_to_hub

    (adapter / "notes.md").write_text("my notes\n")
    result = push_to_hub(adapter, "user/repo")
    (_, _), (_, _, uploaded) = recorded_uploads
    assert sorted(uploaded) == sorted(result.files)
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "peft_tensor.json"} <= set(uploaded)
    assert uploaded["notes.md"] == b"my notes\n"
    assert uploaded["adapter_model.safetensors"] == (adapter / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("target", ["outside", "inside"])
def test_push_refuses_a_symlinked_file(adapter, outside, recorded_uploads, target):
    """A linked private key went up as notes.md; now any symlink among the files to upload is refused, named, with
    the fix (copy or remove), before anything is sent."""
    from peft_tensor.hub import push_to_hub

    link_to = outside / "private_key.txt" if target == "outside" else adapter / "adapter_config.json"
    (adapter / "notes.md").symlink_to(link_to)
    with pytest.raises(UnsafePathError) as err:
        push_to_hub(adapter, "user/repo")
    message = str(err.value)
    assert "notes.md" in message and "symbolic link" in message and "copy" in message and "remove" in message
    assert isinstance(err.value, PeftTensorError)
    assert recorded_uploads == []  # nothing created, nothing committed


def test_push_refuses_a_symlinked_subfolder(adapter, outside, recorded_uploads):
    from peft_tensor.hub import push_to_hub

    (outside / "adapter_config.json").write_text("{}")
    (adapter / "extra").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafePathError, match="extra"):
        push_to_hub(adapter, "user/repo")
    assert recorded_uploads == []


def test_push_refuses_a_symlinked_provenance_before_the_base_weights_go_up(adapter, outside, recorded_uploads):
    """peft_tensor.json is read and re-uploaded: a link there is refused too, before any commit (base weights
    included)."""
    from peft_tensor.hub import push_to_hub

    target = outside / "peft_tensor.json"
    shutil.move(adapter / "peft_tensor.json", target)
    (adapter / "peft_tensor.json").symlink_to(target)
    with pytest.raises(UnsafePathError, match="peft_tensor.json"):
        push_to_hub(adapter, "user/repo", base_weights_repo="user/base", base_weights=outside / "model.safetensors")
    assert recorded_uploads == []


def test_cli_push_refuses_a_symlink_with_a_clear_error(adapter, outside, recorded_uploads, capsys):
    (adapter / "notes.md").symlink_to(outside / "private_key.txt")
    assert main(["push", str(adapter), "user/repo"]) == 1
    err = capsys.readouterr().err
    assert "notes.md" in err and "copy" in err
    assert recorded_uploads == []


# ------------------------------------------------------------------------------------------------- save_pretrained
def test_save_pretrained_replaces_planted_symlinks_never_writes_through_them(lora_model, tmp_path, outside):
    from safetensors.torch import load_file

    from peft_tensor.hub import save_pretrained

    dest = tmp_path / "adapter"
    dest.mkdir()
    names = ("README.md", "adapter_config.json", "adapter_model.safetensors", "peft_tensor.json")
    for name in names:
        (outside / name).write_text(SECRET)
        (dest / name).symlink_to(outside / name)
    save_pretrained(lora_model, dest)
    for name in names:
        assert (outside / name).read_text() == SECRET, f"{name} was written through its symlink"
        assert not (dest / name).is_symlink() and (dest / name).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    assert json.loads((dest / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert json.loads((dest / "peft_tensor.json").read_text())["adapters"]["default"]["stored_values"] > 0
    weights = load_file(dest / "adapter_model.safetensors")
    assert weights and all("lora_" in key for key in weights)


def _half_then_raise(path, text):
    with open(path, "w") as fh:
        fh.write(text[: len(text) // 2])
    raise RuntimeError("killed mid-save")


@pytest.mark.parametrize("writer", ["config", "card"])
def test_save_pretrained_interrupted_mid_write_leaves_the_old_files_whole(lora_model, tmp_path, monkeypatch, writer):
    """PEFT writes README.md then adapter_config.json with plain ``open(..., "w")``; a kill half-way through one
    of them used to leave it truncated in the destination."""
    import peft.config
    import peft.peft_model

    from peft_tensor.hub import save_pretrained

    dest = tmp_path / "adapter"
    save_pretrained(lora_model, dest, training_data="the old run")
    before = {p.name: p.read_bytes() for p in dest.iterdir()}

    if writer == "config":
        def fake(self, save_directory, **kwargs):
            _half_then_raise(os.path.join(save_directory, "adapter_config.json"), '{"peft_type": "LORA", "r": 2}')

        monkeypatch.setattr(peft.config.PeftConfigMixin, "save_pretrained", fake)
    else:
        def fake(self, output_dir):
            _half_then_raise(os.path.join(output_dir, "README.md"), "---\nlibrary_name: peft\n---\n# card\n")

        monkeypatch.setattr(peft.peft_model.PeftModel, "create_or_update_model_card", fake)
    with pytest.raises(RuntimeError, match="killed mid-save"):
        save_pretrained(lora_model, dest, training_data="the new run")
    after = {p.name: p.read_bytes() for p in dest.iterdir()}
    assert after == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the temporary folder is cleaned up


def test_save_pretrained_refuses_a_symlinked_adapter_subfolder(lora_model, tmp_path, outside):
    """A named adapter's subfolder planted as a symlink would send its files outside: refused."""
    from peft import LoraConfig

    from peft_tensor.hub import save_pretrained

    lora_model.add_adapter("second", LoraConfig(r=2, lora_alpha=4, target_modules=["attn.qkv"]))
    try:
        dest = tmp_path / "adapter"
        dest.mkdir()
        (dest / "second").symlink_to(outside, target_is_directory=True)
        with pytest.raises(UnsafePathError, match="second"):
            save_pretrained(lora_model, dest)
        assert sorted(p.name for p in outside.iterdir()) == ["private_key.txt"]
    finally:
        lora_model.delete_adapter("second")


def test_run_folder_adapter_without_provenance_replaces_planted_symlinks(tmp_path, outside):
    """The run-output writer's fallback for networks it cannot describe calls PEFT's writer too."""
    torch = pytest.importorskip("torch")
    from peft import LoraConfig, get_peft_model

    from peft_tensor.training.outputs import _save_unrecorded

    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), LoraConfig(r=2, target_modules=["0"]))
    folder = tmp_path / "adapter"
    folder.mkdir()
    for name in ("README.md", "adapter_config.json"):
        (outside / name).write_text(SECRET)
        (folder / name).symlink_to(outside / name)
    _save_unrecorded(model, folder, {"training_data": "toy"})
    for name in ("README.md", "adapter_config.json"):
        assert (outside / name).read_text() == SECRET and not (folder / name).is_symlink()


# ------------------------------------------------------------------------------------------------------------ plots
def test_plots_replace_planted_symlinks(tmp_path, outside):
    pytest.importorskip("matplotlib")
    from peft_tensor.training.plots import plot_curves, plot_overlay

    run = tmp_path / "run"
    run.mkdir()
    for name in ("curves.png", "overlay_best.png"):
        (run / name).symlink_to(outside / "private_key.txt")
    plot_curves([{"step": 1, "loss": 1.0, "val_dice": 0.5}, {"step": 2, "loss": 0.5}], run / "curves.png")
    truth = np.zeros((8, 8, 8), bool)
    truth[2:5, 2:5, 2:5] = True
    plot_overlay(np.random.default_rng(0).random((8, 8, 8)), truth, truth, run / "overlay_best.png", "best")
    assert (outside / "private_key.txt").read_text() == SECRET
    for name in ("curves.png", "overlay_best.png"):
        assert not (run / name).is_symlink()
        assert (run / name).read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in run.iterdir()) == ["curves.png", "overlay_best.png"]  # no temporary left


# ------------------------------------------------------------------------------------------------------------- copy
@pytest.mark.parametrize("name", ["evaluate", "finetune_unetr_lora"])  # a recipe (copied) and a config (resolved)
def test_copy_refuses_a_dangling_symlink_without_force(tmp_path, outside, capsys, name):
    dest = tmp_path / "mine.txt"
    dest.symlink_to(outside / "created_through_the_link")
    assert main(["copy", name, str(dest)]) == 1
    assert "symbolic link" in capsys.readouterr().err
    assert not (outside / "created_through_the_link").exists() and dest.is_symlink()


@pytest.mark.parametrize("dangling", [True, False])
@pytest.mark.parametrize("name", ["evaluate", "finetune_unetr_lora"])
def test_copy_force_replaces_the_link_itself(tmp_path, outside, name, dangling):
    target = outside / ("created_through_the_link" if dangling else "private_key.txt")
    dest = tmp_path / "mine.txt"
    dest.symlink_to(target)
    assert main(["copy", name, str(dest), "--force"]) == 0
    assert not dest.is_symlink() and dest.stat().st_size > 0
    if dangling:
        assert not target.exists()
    else:
        assert target.read_text() == SECRET


# ------------------------------------------------------------------------------------------------------ atomic writer
def test_atomic_write_replaces_a_symlink_leaving_its_target_untouched(tmp_path, outside):
    link = tmp_path / "out.txt"
    link.symlink_to(outside / "private_key.txt")
    atomic_write_text(link, "new")
    assert not link.is_symlink() and link.read_text() == "new"
    assert (outside / "private_key.txt").read_text() == SECRET


def test_atomic_write_does_not_take_the_mode_of_a_symlink_target(tmp_path, outside, umask):
    """``_mode_for`` followed the link: the result took the permissions of whatever file it pointed to."""
    target = outside / "private_key.txt"
    os.chmod(target, 0o755)
    link = tmp_path / "out.txt"
    link.symlink_to(target)
    atomic_write(link, lambda tmp: Path(tmp).write_text("x"))
    assert not link.is_symlink() and _mode(link) == 0o644
    assert _mode(target) == 0o755 and target.read_text() == SECRET


@pytest.mark.parametrize("kind", ["dangling", "loop"])
def test_atomic_write_replaces_dangling_and_looping_symlinks(tmp_path, outside, umask, kind):
    link = tmp_path / "out.txt"
    link.symlink_to(outside / "missing" if kind == "dangling" else link)
    atomic_write_text(link, "new")
    assert not link.is_symlink() and link.read_text() == "new" and _mode(link) == 0o644
    assert sorted(p.name for p in outside.iterdir()) == ["private_key.txt"]
