"""Values and class paths from files (bundle configs, ``peft_tensor.json``, ``backbone.json``) are data: one decoder
with a closed list of tagged forms, an allow-list of network classes that never imports a path named by a file, and
no constructor argument that reads files or URLs unless the caller passes ``trust_remote_code=True``."""

from __future__ import annotations

import json
import sys
import urllib.request

import pytest
import torch
from torch import nn

from peft_tensor.hub import BaseNetwork, ProvenanceError, load_pretrained
from peft_tensor.hub.provenance import PROVENANCE_FILE, decode_value, import_network_class
from peft_tensor.networks import build_from_spec, load_network
from peft_tensor.networks.specs import preset_for

UNET = "monai.networks.nets.UNet"
UNET_KW = dict(spatial_dims=2, in_channels=1, out_channels=2, channels=[4, 8], strides=[2], num_res_units=0)
UNETR_KW = dict(in_channels=1, out_channels=2, img_size=[16, 16, 16], feature_size=8, hidden_size=96, mlp_dim=192,
                num_heads=4, dropout_rate=0.0)
CLI_MAIN = "peft_tensor.cli.__main__"


class TinyNet(nn.Module):
    def __init__(self, width: int = 2):
        super().__init__()
        self.lin = nn.Linear(width, width)


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture
def torch_load_calls(monkeypatch):
    """Every torch.load call, recorded; none may come from a decoded config."""
    calls = []

    def fake_load(*args, **kwargs):
        calls.append((args, kwargs))
        raise AssertionError(f"torch.load called with {args} {kwargs}")

    monkeypatch.setattr(torch, "load", fake_load)
    return calls


@pytest.fixture
def no_download(monkeypatch):
    """Any download (urllib, requests, torch.hub, MONAI's download_url) raises instead of fetching."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise RuntimeError(f"download attempted: {args}")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(urllib.request, "urlretrieve", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    import monai.apps.utils
    import monai.networks.nets.hovernet as hovernet

    monkeypatch.setattr(monai.apps.utils, "download_url", refuse)
    monkeypatch.setattr(hovernet, "download_url", refuse)
    try:
        import requests

        monkeypatch.setattr(requests, "get", refuse)
        monkeypatch.setattr(requests.Session, "request", refuse)
    except ImportError:  # pragma: no cover
        pass
    return calls


def _payload(tmp_path):
    pickled = tmp_path / "evil.pkl"
    pickled.write_bytes(b"not really a pickle")
    return [{"__torch_dtype__": "load"}, {"f": str(pickled), "weights_only": False}], str(pickled)


def _bundle(folder, network_def: dict):
    from safetensors.torch import save_file

    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    (folder / "configs" / "inference.json").write_text(json.dumps({"network_def": network_def}))
    save_file({"x": torch.zeros(1)}, str(folder / "models" / "model.safetensors"))
    return folder


def _adapter_folder(folder, base_network: dict):
    """An adapter folder as load_pretrained reads it: adapter_config.json, weights, peft_tensor.json whose base
    weights exist (so that load_network gets as far as building the network)."""
    from safetensors.torch import save_file

    from peft_tensor.hub.provenance import sha256_file

    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2,
                                                             "target_modules": ["conv"]}))
    save_file({"base_model.model.x.lora_A.weight": torch.zeros(2, 2)}, str(folder / "adapter_model.safetensors"))
    base = folder / "base.safetensors"
    save_file({"x": torch.zeros(1)}, str(base))
    weights = {"sha256": sha256_file(base), "path": str(base)}
    record = {"format_version": 1, "base_network": {**base_network, "weights": weights}}
    (folder / PROVENANCE_FILE).write_text(json.dumps(record))
    return folder


# ------------------------------------------------------------------------------------------------------ 1. decoder
def test_decoder_allows_dtypes_and_json_only():
    assert decode_value({"dtype": {"__torch_dtype__": "bfloat16"}, "x": [1, 2.5, "a", None, True]}) == {
        "dtype": torch.bfloat16, "x": [1, 2.5, "a", None, True]}
    for name in ("float16", "float32", "float64", "int8", "int64", "uint8", "bool", "complex64"):
        assert decode_value({"__torch_dtype__": name}) == getattr(torch, name)
    for bad in ("load", "save", "hub", "nn", "Tensor", "float32.__class__", "device", 3, None):
        with pytest.raises(ProvenanceError, match="__torch_dtype__"):
            decode_value({"act": [{"__torch_dtype__": bad}]})
    with pytest.raises(ProvenanceError, match=r"act\[0\]"):
        decode_value({"act": [{"__torch_dtype__": "load"}, {}]}, "kwargs")
    with pytest.raises(ProvenanceError, match="__class__"):
        decode_value({"x": {"__class__": "os.system"}})
    with pytest.raises(ProvenanceError, match="x"):
        decode_value({"x": object()})
    with pytest.raises(ProvenanceError, match="__torch_dtype__"):
        decode_value({"x": {"__torch_dtype__": "float32", "extra": 1}})


def test_torch_load_payload_in_bundle_network_def_is_refused(tmp_path, torch_load_calls):
    act, _ = _payload(tmp_path)
    bundle = _bundle(tmp_path / "bundle", {"_target_": UNET, **UNET_KW, "act": act})
    with pytest.raises(ProvenanceError, match="__torch_dtype__") as err:
        load_network(bundle)
    assert "act" in str(err.value)
    with pytest.raises(ProvenanceError, match="__torch_dtype__"):  # no opt-in turns a tag into a callable
        load_network(bundle, trust_remote_code=True)
    assert torch_load_calls == []


def test_torch_load_payload_in_adapter_record_is_refused(tmp_path, torch_load_calls):
    act, _ = _payload(tmp_path)
    folder = _adapter_folder(tmp_path / "adapter", {"class": UNET, "kwargs": {**UNET_KW, "act": act}})
    with pytest.raises(ProvenanceError, match="__torch_dtype__"):
        load_pretrained(folder)
    with pytest.raises(ProvenanceError, match="__torch_dtype__"):
        load_pretrained(folder, trust_remote_code=True)
    with pytest.raises(ProvenanceError, match="__torch_dtype__"):  # the provenance folder source of load_network
        load_network(folder)
    assert torch_load_calls == []


def test_meta_build_and_records_use_the_same_decoder(tmp_path, torch_load_calls):
    act, _ = _payload(tmp_path)
    with pytest.raises(ProvenanceError, match="__torch_dtype__"):
        preset_for(UNET, {**UNET_KW, "act": act})
    with pytest.raises(ProvenanceError, match="__torch_dtype__"):
        BaseNetwork(UNET, {**UNET_KW, "act": act}).build()
    assert torch_load_calls == []


# ------------------------------------------------------------------------------------------------------ 2. classes
def test_class_outside_the_allow_list_is_never_imported(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["peft-tensor"])
    monkeypatch.delitem(sys.modules, CLI_MAIN, raising=False)
    bundle = _bundle(tmp_path / "bundle", {"_target_": f"{CLI_MAIN}.Net"})
    with pytest.raises(ProvenanceError, match="trust_remote_code=True"):
        load_network(bundle)
    with pytest.raises(ProvenanceError, match="trust_remote_code=True"):
        BaseNetwork(f"{CLI_MAIN}.Net", {}).build()
    folder = _adapter_folder(tmp_path / "adapter", {"class": f"{CLI_MAIN}.Net", "kwargs": {}})
    with pytest.raises(ProvenanceError, match="trust_remote_code=True"):
        load_pretrained(folder)
    assert CLI_MAIN not in sys.modules


def test_allow_list_resolves_monai_and_transformers_without_importing_the_given_path():
    from monai.networks.nets import UNETR

    assert import_network_class("monai.networks.nets.UNETR") is UNETR
    assert import_network_class("monai.networks.nets.unetr.UNETR") is UNETR  # the defining module
    for path in ("monai.networks.blocks.UNETR", "monai.networks.nets.unetr.SwinUNETR", "monai.bundle.run",
                 "monai.networks.nets.no_such_module.UNETR", "peft_tensor.tuners.tensor_group.TensorGroup"):
        with pytest.raises(ProvenanceError, match="trust_remote_code"):
            import_network_class(path)
    assert "monai.networks.nets.no_such_module" not in sys.modules
    transformers = pytest.importorskip("transformers")
    assert import_network_class("transformers.BertModel") is transformers.BertModel
    assert import_network_class("transformers.models.bert.modeling_bert.BertModel") is transformers.BertModel
    with pytest.raises(ProvenanceError, match="trust_remote_code"):
        import_network_class("transformers.BertConfig")


def test_code_supplied_roots_still_work():
    assert import_network_class(f"{__name__}.TinyNet", None) is TinyNet  # code: trusted
    assert import_network_class(f"{__name__}.TinyNet", ("monai", "tests")) is TinyNet  # roots named in code
    with pytest.raises(ProvenanceError, match="trust_remote_code"):
        import_network_class(f"{__name__}.TinyNet")  # default roots: the allow-list only
    assert import_network_class(f"{__name__}.TinyNet", trust_remote_code=True) is TinyNet
    with pytest.raises(ProvenanceError, match="outside the trusted packages"):
        import_network_class("os.system", ("monai",))
    assert isinstance(build_from_spec(f"{__name__}.TinyNet", {"width": 3}), TinyNet)


# ------------------------------------------------------------------------------------------------------ 3. arguments
HOVERNET = {"_target_": "monai.networks.nets.HoVerNet", "in_channels": 3, "np_out_channels": 2,
            "pretrained_url": "https://example.invalid/weights.pth"}


def test_io_argument_is_refused_before_any_download(tmp_path, no_download):
    bundle = _bundle(tmp_path / "bundle", HOVERNET)
    with pytest.raises(ProvenanceError, match="pretrained_url") as err:
        load_network(bundle)
    assert "trust_remote_code=True (CLI: --trust-remote-code) only if you trust the source" in str(err.value)
    assert no_download == []
    with pytest.raises(RuntimeError, match="download attempted"):  # opting in reaches the constructor
        load_network(bundle, trust_remote_code=True)
    folder = _adapter_folder(tmp_path / "adapter", {"class": HOVERNET["_target_"], "kwargs": {
        k: v for k, v in HOVERNET.items() if k != "_target_"}})
    no_download.clear()
    with pytest.raises(ProvenanceError, match="pretrained_url"):
        load_pretrained(folder)
    assert no_download == []


def test_unknown_argument_names_the_accepted_ones(tmp_path):
    bundle = _bundle(tmp_path / "bundle", {"_target_": UNET, **UNET_KW})
    folder = _adapter_folder(tmp_path / "adapter", {"class": UNET, "kwargs": {**UNET_KW, "no_such_arg": 1}})
    with pytest.raises(ProvenanceError, match="no_such_arg") as err:
        load_pretrained(folder)
    assert "spatial_dims" in str(err.value)
    with pytest.raises(ProvenanceError, match="no_such_arg"):
        BaseNetwork(UNET, {**UNET_KW, "no_such_arg": 1}).build()
    del bundle


def test_harmless_values_of_io_like_names_pass(tmp_path):
    net = BaseNetwork("monai.networks.nets.HoVerNet", {"in_channels": 3, "pretrained_url": None,
                                                        "freeze_encoder": False}).build()
    assert type(net).__name__ == "HoVerNet"
    swin = BaseNetwork("monai.networks.nets.SwinUNETR", {"in_channels": 1, "out_channels": 2, "feature_size": 12,
                                                         "depths": [1, 1, 1, 1], "use_checkpoint": True})
    assert type(swin.build()).__name__ == "SwinUNETR"  # gradient checkpointing, not a file


def test_code_built_networks_take_any_argument():
    from peft_tensor.hub import build_network

    net = build_network("monai.networks.nets.HoVerNet", in_channels=3, pretrained_state_dict_key=None)
    assert type(net).__name__ == "HoVerNet"


def test_cli_flag_is_threaded(tmp_path, capsys, no_download):
    from peft_tensor.cli import build_parser, main

    parser = build_parser()
    for argv in (["load", "src", "--trust-remote-code"], ["export", "src", "--out", "o", "--trust-remote-code"]):
        assert parser.parse_args(argv).trust_remote_code is True
    assert parser.parse_args(["load", "src"]).trust_remote_code is False
    folder = _adapter_folder(tmp_path / "adapter", {"class": HOVERNET["_target_"], "kwargs": {
        k: v for k, v in HOVERNET.items() if k != "_target_"}})
    assert main(["load", str(folder)]) == 1
    err = capsys.readouterr().err
    assert "pretrained_url" in err and "--trust-remote-code" in err
    assert no_download == []
    help_text = parser._subparsers._group_actions[0].choices["load"].format_help()
    assert "--trust-remote-code" in help_text and "URL" in help_text


def test_run_flag_runs_the_recipe_trusting_remote_code(tmp_path, monkeypatch):
    from peft_tensor.cli import recipes, trusted_run
    from peft_tensor.hub.provenance import remote_code_trusted

    assert recipes._run_parser().parse_args(["--trust-remote-code"]).trust_remote_code is True
    assert "URL" in recipes._run_parser().format_help()
    script = tmp_path / "recipe.py"
    out = tmp_path / "seen.txt"
    script.write_text("import sys\nfrom peft_tensor.hub.provenance import remote_code_trusted\n"
                      f"open({str(out)!r}, 'w').write(str(remote_code_trusted()) + ' ' + ' '.join(sys.argv[1:]))\n")
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    trusted_run.main([str(script), "a=1"])
    assert out.read_text() == "True a=1" and remote_code_trusted() is False
    calls = []
    monkeypatch.setattr(recipes.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    assert recipes._run(type("A", (), {"recipe": str(script), "rest": ["--trust-remote-code", "x=2"]})()) == 0
    assert calls[-1][1:] == ["-m", "peft_tensor.cli.trusted_run", str(script), "x=2"]
    assert recipes._run(type("A", (), {"recipe": str(script), "rest": ["x=2"]})()) == 0
    assert calls[-1][1:] == [str(script), "x=2"]


def test_backbone_json_is_read_as_a_file(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.delitem(sys.modules, CLI_MAIN, raising=False)
    folder = tmp_path / "backbone"
    folder.mkdir()
    (folder / "backbone.json").write_text(json.dumps({"_target_": f"{CLI_MAIN}.Net", "name": "x", "kwargs": {}}))
    save_file({"x": torch.zeros(1)}, str(folder / "model.safetensors"))
    with pytest.raises(ProvenanceError, match="trust_remote_code"):
        load_network(folder)
    assert CLI_MAIN not in sys.modules


def test_recipe_backbone_json_cannot_import_or_fetch(tmp_path):
    """The recipes' ``model.pretrained`` folder (``backbone.json`` + ``model.safetensors``) is a file from anyone: a
    ``_target_`` off the allow-list is refused before its module is imported, an I/O argument before any build."""
    import json
    import sys

    from safetensors.torch import save_file

    from peft_tensor.training.models import load_backbone

    sys.modules.pop("peft_tensor.cli.__main__", None)
    save_file({"w": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "backbone.json").write_text(json.dumps({"name": "peft_tensor.cli.__main__.Net", "kwargs": {}}))
    with pytest.raises(ValueError, match="allow|trust"):
        load_backbone(tmp_path)
    assert "peft_tensor.cli.__main__" not in sys.modules
    (tmp_path / "backbone.json").write_text(json.dumps(
        {"name": "monai.networks.nets.HoVerNet", "kwargs": {"pretrained_url": "http://127.0.0.1:9/x.pth"}}))
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_backbone(tmp_path)
