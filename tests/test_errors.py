"""Bad input gets a clear error naming the culprit and the fix, and nothing the user had is lost."""

import json
import shutil

import pytest
import torch
from peft import get_peft_model
from torch import nn

import peft_tensor
from peft_tensor import HyPSConfig, LoraPTConfig, TCURLoraConfig
from peft_tensor.errors import AdapterLoadError, GroupingError, PeftTensorError, RankError, TargetModulesError
from tests._models import UNETR_TARGETS, TinyMLP, tiny_unetr

CONFIGS = [TCURLoraConfig, LoraPTConfig]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_target_modules_matching_nothing(cfg):
    model = TinyMLP()
    with pytest.raises(TargetModulesError, match=r"matched no module of TinyMLP.*'lin0', 'lin1'"):
        get_peft_model(model, cfg(target_modules=["attn.qkv"]))
    assert all(type(m) is not peft_tensor.tuners.tensor_group.TensorGroupLayer for m in model.modules())


@pytest.mark.parametrize("cfg", CONFIGS)
def test_missing_target_modules(cfg):
    with pytest.raises(PeftTensorError, match=r"target_modules=\[\] names no module: pass None for the network's "
                       "preset"):
        cfg(r=2, target_modules=[])


@pytest.mark.parametrize("cfg", CONFIGS)
def test_paper_grouping_on_other_model(cfg):
    model = TinyMLP()
    with pytest.raises(GroupingError, match=r"'lin1' does not fit the paper grouping.*by_shape"):
        get_peft_model(model, cfg(r=2, target_modules=["lin1", "lin2"], grouping="paper"))
    assert isinstance(model.lin1, nn.Linear) and type(model.lin1) is nn.Linear, "model must be untouched"


def test_paper_grouping_blocks_must_match():
    model = tiny_unetr(num_layers=2)
    with pytest.raises(GroupingError, match="every block must contribute the same layers"):
        get_peft_model(model, TCURLoraConfig(r=2, target_modules=["0.attn.qkv", "attn.out_proj"], grouping="paper"))


@pytest.mark.parametrize("cfg", CONFIGS)
def test_rank_too_large(cfg):
    model = TinyMLP(width=6)
    with pytest.raises(RankError, match=r"r=7 exceeds min\(n1, n2\)=6 of group 'shape_6x6'.*"
                                        r"Pass rank_pattern=\{'\(lin1\|lin2\)': 6\} or rank_cap=True.*choose r <= 6"):
        get_peft_model(model, cfg(r=7, target_modules=["lin1", "lin2"]))
    assert type(model.lin1) is nn.Linear


@pytest.mark.parametrize("cfg", CONFIGS)
def test_unsupported_layer_type(cfg):
    model = tiny_unetr(num_layers=1)
    match = r"matched 'vit.blocks.0.norm1' \(LayerNorm\).*cannot adapt.*e.g. target_modules="
    with pytest.raises(TargetModulesError, match=match):
        get_peft_model(model, cfg(r=2, target_modules=["attn.qkv", "norm1"]))


@pytest.mark.parametrize("bad", [{"r": 0}, {"r": 2.5}, {"grouping": "rows"}])
def test_invalid_config_values(bad):
    kwargs = {"r": 2, "target_modules": ["lin1"], **bad}
    with pytest.raises(PeftTensorError):
        TCURLoraConfig(**kwargs)
    with pytest.raises(PeftTensorError, match="core must be"):
        LoraPTConfig(r=2, target_modules=["lin1"], core="sparse")


@pytest.fixture(scope="module")
def saved_unetr_adapter(tmp_path_factory):
    path = tmp_path_factory.mktemp("adapter")
    pm = get_peft_model(tiny_unetr(num_layers=4), TCURLoraConfig(r=4, target_modules=UNETR_TARGETS, grouping="paper"))
    pm.save_pretrained(path)
    return path


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("other, match", [
    (lambda: tiny_unetr(num_layers=3),
     r"group .attention. was a 16 x 96 x 96 tensor when trained, this model gives 12 x 96 x 96"),
    (lambda: TinyMLP(), r"matched no module of TinyMLP"),
])
def test_load_onto_other_base_model(saved_unetr_adapter, other, match):
    model = other()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(AdapterLoadError, match=match):
        peft_tensor.from_pretrained(model, str(saved_unetr_adapter))
    assert set(model.state_dict()) == set(before), "the base model must be untouched after a refused load"
    for n, p in model.state_dict().items():
        assert torch.equal(p, before[n])


def test_load_onto_wider_model(saved_unetr_adapter):
    from monai.networks.nets import UNETR

    wider = UNETR(in_channels=1, out_channels=2, img_size=32, feature_size=8, hidden_size=48, mlp_dim=96,
                  num_heads=4, proj_type="conv")
    wider.vit.blocks = wider.vit.blocks[:4]
    with pytest.raises(AdapterLoadError, match=r"16 x 96 x 96 tensor when trained, this model gives 16 x 48 x 48"):
        peft_tensor.from_pretrained(wider, str(saved_unetr_adapter))
    # PEFT's own loader is guarded too: the saved group shape is checked as the state dict loads
    from peft import PeftModel

    with pytest.raises(AdapterLoadError, match="belongs to another network"):
        PeftModel.from_pretrained(wider, saved_unetr_adapter)


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.pop("peft_type"), "has no 'peft_type'"),
    (lambda c: c.__setitem__("peft_type", "FANCYLORA"), "peft_type 'FANCYLORA'.*import it first"),
    (lambda c: c.__setitem__("peft_tensor_version", "99.0"), r"written by peft_tensor 99.0.*pip install -U"),
])
def test_bad_adapter_config(saved_unetr_adapter, tmp_path, edit, match):
    path = _copy(saved_unetr_adapter, tmp_path / "a")
    cfg = json.loads((path / "adapter_config.json").read_text())
    edit(cfg)
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterLoadError, match=match):
        peft_tensor.from_pretrained(tiny_unetr(num_layers=4), str(path))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupted_safetensors(saved_unetr_adapter, tmp_path, damage):
    path = _copy(saved_unetr_adapter, tmp_path / "a")
    f = path / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!}",
                   "empty": b""}[damage])
    model = tiny_unetr(num_layers=4)
    with pytest.raises(AdapterLoadError, match="corrupted or was cut off"):
        peft_tensor.from_pretrained(model, str(path))
    assert not hasattr(model, "peft_config")


def test_pickled_only_adapter_is_refused(saved_unetr_adapter, tmp_path):
    path = _copy(saved_unetr_adapter, tmp_path / "a")
    (path / "adapter_model.safetensors").rename(path / "adapter_model.bin")
    with pytest.raises(AdapterLoadError, match="safetensors only"):
        peft_tensor.from_pretrained(tiny_unetr(num_layers=4), str(path))


def test_not_an_adapter_dir(tmp_path):
    with pytest.raises(AdapterLoadError, match="No adapter_config.json"):
        peft_tensor.from_pretrained(TinyMLP(), str(tmp_path))


def _safetensors_bytes(header, data: bytes = b"\0" * 8) -> bytes:
    import struct

    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _f32(offsets, shape=(2,)):
    return {"dtype": "F32", "shape": list(shape), "data_offsets": offsets}


# each header is well-formed JSON and (except where the offsets themselves are unreadable) describes exactly the
# 8 data bytes that follow it, so only a check of the header's structure can refuse it
MALFORMED_HEADERS = {
    "list": [],
    "string": "w",
    "entry not an object": {"w": [0, 8]},
    "no data_offsets": {"w": {"dtype": "F32", "shape": [2]}},
    "string offsets": {"w": _f32(["0", "8"])},
    "float offsets": {"w": _f32([0.0, 8.0])},
    "bool offsets": {"w": _f32([False, 8])},
    "one offset": {"w": _f32([8])},
    "null offsets": {"w": _f32(None)},
    "negative offset": {"a": _f32([0, 8]), "b": _f32([-8, 0])},
    "end before begin": {"a": _f32([0, 8]), "b": _f32([8, 4], shape=())},
    "overlapping tensors": {"a": _f32([0, 8]), "b": _f32([4, 8], shape=(1,))},
    "gap before a tensor": {"a": _f32([4, 8], shape=(1,))},
    "shape not a list": {"w": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}},
    "no shape": {"w": {"dtype": "F32", "data_offsets": [0, 8]}},
    "no dtype": {"w": {"shape": [2], "data_offsets": [0, 8]}},
    "size does not match shape": {"w": _f32([0, 8], shape=(3,))},
    "metadata not an object": {"__metadata__": ["x"], "w": _f32([0, 8])},
}


@pytest.mark.parametrize("kind", list(MALFORMED_HEADERS))
def test_malformed_safetensors_header_is_a_load_error(saved_unetr_adapter, tmp_path, kind):
    """Not TypeError / KeyError / silence: a typed AdapterLoadError from every reader, before the model is touched."""
    from peft_tensor.hub.adapter_files import tensor_shapes
    from peft_tensor.loading import read_safetensors_header

    path = _copy(saved_unetr_adapter, tmp_path / "a")
    f = path / "adapter_model.safetensors"
    f.write_bytes(_safetensors_bytes(MALFORMED_HEADERS[kind]))
    with pytest.raises(AdapterLoadError, match="safetensors header"):
        read_safetensors_header(f)
    with pytest.raises(AdapterLoadError, match="safetensors header"):
        tensor_shapes(path)
    model = tiny_unetr(num_layers=4)
    with pytest.raises(AdapterLoadError, match="corrupted or was cut off"):
        peft_tensor.from_pretrained(model, str(path))
    assert not hasattr(model, "peft_config")


def test_well_formed_safetensors_header_is_accepted(tmp_path):
    """The structure checks refuse nothing that safetensors itself writes (empty tensors, metadata, any order)."""
    from safetensors.torch import save_file

    from peft_tensor.loading import read_safetensors_header

    tensors = {"z": torch.ones(3, 2), "a": torch.zeros(0, 4), "m": torch.arange(5, dtype=torch.int64),
               "s": torch.tensor(1.5, dtype=torch.bfloat16), "b": torch.tensor([True, False])}
    save_file(tensors, tmp_path / "f.safetensors", metadata={"format": "pt"})
    header = read_safetensors_header(tmp_path / "f.safetensors")
    assert {k: tuple(v["shape"]) for k, v in header.items()} == {k: tuple(t.shape) for k, t in tensors.items()}


def test_targets_matching_nothing_in_a_cnn_name_its_convolutions():
    from monai.networks.nets import BasicUNet

    net = BasicUNet(spatial_dims=3, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 16, 4))
    # tCURLoRA r=2: the 1-channel input convolution (conv_0.conv_0.conv) allows r <= 1, so no explicit suffix matching
    # it is suggested (the preset caps it: rank_cap=None); HyPS factorises it as 4 x 27 and can take both
    for config, names in ((TCURLoraConfig(r=2, target_modules=["norm"]),
                           r"pass target_modules=None for BasicUNet's preset, or name its layers .* e.g. "
                           r"target_modules=\['conv_1.conv', 'convs.conv_0.conv'"),
                          (HyPSConfig(r=2, target_modules=["attn.qkv"]),
                           r"pass target_modules=None for BasicUNet's preset, or name its layers .* e.g. "
                           r"target_modules=\['conv_0.conv', 'conv_1.conv'")):
        with pytest.raises(TargetModulesError, match=r"matched no module of BasicUNet: " + names):
            get_peft_model(net, config)


def test_rank_above_a_thin_convolution_names_the_layer_and_the_ways_out():
    """The first conv of a CNN (1 input channel) caps r at 1 in the kernel layout: the error names the layer, the
    cap, leaving it out, and conv_layout='stacked' (with which the same r works)."""
    from monai.networks.nets import BasicUNet

    net = BasicUNet(spatial_dims=3, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 16, 4))
    with pytest.raises(RankError, match=r"rank_pattern=\{'conv_0.conv_0.conv': 1\} or rank_cap=True.*"
                                        r"choose r <= 1, or leave 'conv_0.conv_0.conv' out of target_modules.*"
                                        r"conv_layout='stacked'"):
        get_peft_model(net, TCURLoraConfig(r=2, target_modules=["conv"]))
    get_peft_model(net, TCURLoraConfig(r=2, target_modules=["conv"], conv_layout="stacked"))
