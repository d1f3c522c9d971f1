"""export_bundle / ``peft-tensor export``: the adapted network merged into a MONAI bundle that monai.bundle and
torch.jit load in a fresh Python process (without peft_tensor) with the adapted model's outputs; the README section
"Start from your pretrained network" runs as written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from peft_tensor.networks import export_bundle, load_network
from peft_tensor.networks.bundle import BundleExportError

from ._nets import SWIN, UNETR, build, same_tensors, swin_kwargs, unetr_kwargs

ATOL = 1e-5  # float32, same CPU; merging W + delta reorders one sum per weight


def _adapted(class_path: str, kwargs: dict, targets) -> torch.nn.Module:
    """A PeftModel whose adapter and trained head are not at their identity initialisation (merging matters)."""
    from peft import get_peft_model

    from peft_tensor import TCURLoraConfig

    pm = get_peft_model(build(class_path, kwargs, seed=1),
                        TCURLoraConfig(r=4, target_modules=list(targets), modules_to_save=["out.conv.conv"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return pm.eval()


READER = textwrap.dedent("""
    import sys, torch
    from monai.bundle import ConfigParser
    root, x = sys.argv[1], torch.load(sys.argv[2], weights_only=True)
    parser = ConfigParser()
    parser.read_config(f"{root}/configs/inference.json")
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(f"{root}/models/model.pt", weights_only=True))
    ts = torch.jit.load(f"{root}/models/model.ts")
    with torch.no_grad():
        torch.save({"bundle": net.eval()(x), "ts": ts(x), "peft_tensor": "peft_tensor" in sys.modules}, sys.argv[3])
""")


def _readme_block() -> tuple[str, str]:
    """The python block of the README section "Start from your pretrained network", split at its training
    comment."""
    from tests._docs import blocks

    (block,) = blocks("README.md", "## Start from your pretrained network")
    before, marker, after = block.partition("# ... fine-tune model ...\n")
    assert marker, "the README block marks where training goes"
    return before, after


def test_readme_block_bundle_round_trip_in_a_fresh_process(tmp_path, monkeypatch):
    """The README block as written on a test-sized 14-class UNETR bundle; the exported bundle is read in a fresh
    process by monai.bundle (ConfigParser network_def + model.pt) and torch.jit (model.ts), without peft_tensor."""
    from .test_load import _write_bundle

    src = build(UNETR, unetr_kwargs(out_channels=14), seed=1)
    _write_bundle(tmp_path / "btcv_unetr_bundle", {"_target_": "UNETR", **unetr_kwargs(out_channels=14)},
                  src.state_dict())
    monkeypatch.chdir(tmp_path)
    load_part, export_part = _readme_block()
    ns: dict = {"__name__": "__readme__"}
    exec(compile(load_part, "README.md", "exec"), ns)
    report, pm = ns["report"], ns["model"]
    assert [m[0] for m in report.mismatched] == ["out.conv.conv.weight", "out.conv.conv.bias"]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # stands in for training: the adapter and the head move away from their initialisation
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    pm.eval()
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = pm(x)
        with pm.disable_adapter():
            base_out = pm(x)
    assert (want - base_out).abs().max() > 1e-3  # the adapter changes the output: merging is tested
    before = {k: v.clone() for k, v in pm.state_dict().items()}
    exec(compile(export_part, "README.md", "exec"), ns)
    out = tmp_path / "my_unetr_bundle"

    assert same_tensors(before, pm.state_dict()) and hasattr(pm, "peft_config")  # the user's model is unchanged
    assert sorted(p.name for p in (out / "configs").iterdir()) == ["inference.json", "metadata.json"]
    assert (out / "models" / "model.pt").is_file() and (out / "models" / "model.ts").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    assert meta["peft_tensor"]["merged_adapters"] == {"default": "TCURLORA"}
    assert meta["peft_tensor"]["torchscript"]["method"] == "torch.jit.script"
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "class 1"}
    inference = json.loads((out / "configs" / "inference.json").read_text())
    assert inference["network_def"] == {"_target_": UNETR, **unetr_kwargs(out_channels=2)}
    assert inference["inferer"]["roi_size"] == [16, 16, 16]

    torch.save(x, tmp_path / "x.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one small forward: threads would only spin
    proc = subprocess.run([sys.executable, "-c", READER, str(out), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "y.pt", weights_only=True)
    assert not got["peft_tensor"]  # plain MONAI + torch read the bundle
    assert torch.allclose(got["bundle"], want, atol=ATOL), (got["bundle"] - want).abs().max()
    assert torch.allclose(got["ts"], want, atol=ATOL), (got["ts"] - want).abs().max()

    net, report = load_network(out)  # and our own loader reads it back completely
    assert report.complete and type(net).__name__ == "UNETR"


def test_swinunetr_bundle_is_traced_and_equal(tmp_path):
    """SwinUNETR does not script under this torch (keyword-only arguments in MONAI's blocks): it is traced. The 2D
    network (same blocks and module names, far cheaper) keeps the test small."""
    kwargs = swin_kwargs(spatial_dims=2)
    pm = _adapted(SWIN, kwargs, ["attn.qkv"])
    out = export_bundle(pm, tmp_path / "swin_bundle", roi_size=[64, 64])
    meta = json.loads((out / "configs" / "metadata.json").read_text())["peft_tensor"]["torchscript"]
    assert meta["method"] == "torch.jit.trace" and meta["input_shape"] == [1, 1, 64, 64]
    assert meta["max_abs_error"] <= ATOL
    ts = torch.jit.load(str(out / "models" / "model.ts"))
    x = torch.randn(1, 1, 96, 64, generator=torch.Generator().manual_seed(2))  # not the traced shape
    with torch.no_grad():
        assert torch.allclose(ts(x), pm(x), atol=ATOL)


def test_export_refusals_and_overwrite(tmp_path):
    plain = build(UNETR, unetr_kwargs())
    out = export_bundle(plain, tmp_path / "b", torchscript=False)  # a plain network exports too
    assert not (out / "models" / "model.ts").exists()
    with pytest.raises(BundleExportError, match="overwrite=True"):
        export_bundle(plain, out, torchscript=False)
    other = build(UNETR, unetr_kwargs(), seed=7)
    export_bundle(other, out, torchscript=False, overwrite=True)
    assert same_tensors(other.state_dict(), torch.load(out / "models" / "model.pt", weights_only=True))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(BundleExportError, match="not a bundle folder"):
        export_bundle(plain, tmp_path / "mine", torchscript=False, overwrite=True)
    from monai.networks.nets import UNETR as UNETRClass

    unrecorded = UNETRClass(**unetr_kwargs())
    with pytest.raises(BundleExportError, match="record_network"):
        export_bundle(unrecorded, tmp_path / "c", torchscript=False)
    with pytest.raises(BundleExportError, match="does not rebuild"):
        export_bundle(unrecorded, tmp_path / "c", torchscript=False,
                      network_def={"_target_": UNETR, **unetr_kwargs(out_channels=3)})
    assert not (tmp_path / "c").exists()


def test_cli_export_with_a_bundle_as_base(tmp_path, capsys):
    from peft_tensor.cli import main

    pm = _adapted(UNETR, unetr_kwargs(), ["attn.qkv"])
    base_bundle = export_bundle(build(UNETR, unetr_kwargs(), seed=1), tmp_path / "base", torchscript=False)
    pm.save_pretrained(str(tmp_path / "adapter"))  # PEFT's own save: no provenance, so --base names the network
    rc = main(["export", str(tmp_path / "adapter"), "--base", str(base_bundle), "--out", str(tmp_path / "merged"),
               "--no-torchscript"])
    text = capsys.readouterr().out
    assert rc == 0 and "LoadReport" in text and "merged default (TCURLORA)" in text
    net, report = load_network(tmp_path / "merged")
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(net.eval()(x), pm(x), atol=ATOL)
    rc = main(["export", str(tmp_path / "adapter"), "--out", str(tmp_path / "other")])
    assert rc == 1 and "base_model" in capsys.readouterr().err  # no record, no --base: says what to pass
