"""Default targets, as PEFT has for transformers: ``TCURLoraConfig()`` / ``LoraPTConfig()`` / ``HyPSConfig()`` with
``target_modules=None`` adapt the network's preset (``peft_tensor.preset_for``) on the real MONAI classes; a target
list that covers only part of a known network's preset warns with the entries it leaves out; refusals say what to
do, name the matched module and its type, suggest only names that work, and use the methods' README names."""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

import peft_tensor
from peft_tensor import HyPSConfig, LoraPTConfig, TCURLoraConfig, preset_for
from peft_tensor._peft_compat import BaseTunerLayer
from peft_tensor.errors import TargetModulesError
from peft_tensor.tuners._targets import PartialPresetWarning, targets_from_preset
from tests.networks._nets import NETS, build, expected_targets

UNETR_LIST = ["attn.qkv", "attn.out_proj", "mlp.linear1", "mlp.linear2"]
# r=1 for the tensor methods: a CNN's preset includes its 1-channel input convolution (r <= 1 as one out x in slice
# per kernel position) until per-group rank caps exist; HyPS at its default r=2 (the input convolution is 8 x 27).
# tCURLoRA and LoRA-PT share their tuner: each takes every other network, HyPS takes all.
TENSOR = (TCURLoraConfig, LoraPTConfig)  # at their default r: rank_cap=None caps a preset's thin layers


@functools.cache
def _net(case: str) -> nn.Module:
    return build(*NETS[case])


def fresh(case: str) -> nn.Module:
    return copy.deepcopy(_net(case))  # SwinUNETR takes seconds to build


def _wrapped(model: nn.Module) -> set[str]:
    return {n for n, m in model.get_base_model().named_modules() if isinstance(m, BaseTunerLayer)}


@pytest.mark.parametrize("case", sorted(NETS))
def test_no_target_modules_adapts_the_networks_preset(case):
    class_path, kwargs = NETS[case]
    expected = expected_targets(case, fresh(case))
    assert expected
    for method, make in (("tensor", TENSOR[sorted(NETS).index(case) % 2]), ("HyPS", HyPSConfig)):
        config = make()
        assert config.target_modules is None
        model = get_peft_model(fresh(case), config)
        assert _wrapped(model) == expected, method
        saved = model.peft_config["default"]  # what adapter_config.json records: the preset's names
        assert saved.target_modules == list(preset_for(class_path, kwargs).target_modules)
        assert targets_from_preset(saved), method  # the flag a per-group rank cap reads
    explicit = HyPSConfig(target_modules=list(saved.target_modules))
    get_peft_model(fresh(case), explicit)
    assert not targets_from_preset(explicit)


def test_preset_for_is_public_and_reads_a_network_or_a_spec():
    assert peft_tensor.preset_for is preset_for and "preset_for" in peft_tensor.__all__
    class_path, kwargs = NETS["swinunetr_v2"]
    net = fresh("swinunetr_v2")
    assert preset_for(net) == preset_for(class_path, kwargs) == preset_for("SwinUNETR", kwargs)
    wrapped = get_peft_model(fresh("unetr"), HyPSConfig())
    assert preset_for(wrapped) == preset_for(*NETS["unetr"])  # a PeftModel is seen through
    assert "attn.proj" in preset_for(net).target_modules and "downsample.reduction" in preset_for(net).target_modules


def test_a_partial_target_list_warns_with_the_preset_entries_it_leaves_out(tmp_path):
    class_path, kwargs = NETS["swinunetr_v2"]
    with pytest.warns(PartialPresetWarning, match=r"cover part of SwinUNETR's preset: they leave out 'attn.proj', "
                      r"'downsample.reduction', 'layers1c.0.layer.conv1.conv'.*Pass target_modules=None") as record:
        model = get_peft_model(fresh("swinunetr_v2"), HyPSConfig(target_modules=UNETR_LIST))
    assert "'attn.qkv'" not in str(record[0].message).split("leave out")[1]
    model.save_pretrained(tmp_path / "partial")
    preset = list(preset_for(class_path, kwargs).target_modules)
    left_out = [e for e in preset if e not in UNETR_LIST]
    quiet = [
        lambda: get_peft_model(fresh("swinunetr_v2"), HyPSConfig(target_modules=preset)),
        lambda: get_peft_model(fresh("swinunetr_v2"), HyPSConfig(target_modules=UNETR_LIST,
                                                                 exclude_modules=left_out)),  # on purpose
        lambda: get_peft_model(fresh("swinunetr_v2"), HyPSConfig(target_modules=["conv_block.conv1.conv"])),
        lambda: PeftModel.from_pretrained(fresh("swinunetr_v2"), tmp_path / "partial"),  # chosen when trained
    ]
    for make in quiet:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PartialPresetWarning)
            make()
    with pytest.warns(PartialPresetWarning, match=r"SegResNet's preset: they leave out 'convInit.conv', "
                      r"'conv2.conv'"):
        get_peft_model(fresh("segresnet"), HyPSConfig(target_modules=["conv1.conv"]))


def test_no_match_in_a_cnn_says_what_to_pass_and_every_suggestion_works():
    # (config, the preset builds, convInit.conv fits): the preset caps its thin layers at rank_cap=None, an explicit
    # list does not, so at r=8 the suggested list leaves out the 1-channel input convolution
    for make, preset, thin in ((lambda t: TCURLoraConfig(r=8, target_modules=t), True, False),
                               (lambda t: TCURLoraConfig(r=8, rank_cap=False, target_modules=t), False, False),
                               (lambda t: TCURLoraConfig(r=8, rank_cap=True, target_modules=t), True, True),
                               (lambda t: TCURLoraConfig(r=1, target_modules=t), True, True),
                               (lambda t: HyPSConfig(r=2, target_modules=t), True, True)):
        with pytest.raises(TargetModulesError) as err:
            get_peft_model(fresh("segresnet"), make(["attn.qkv"]))
        message = str(err.value)
        assert "matched no module of SegResNet: " in message
        assert ("pass target_modules=None for SegResNet's preset" in message) is preset
        suggested = eval(message.split("e.g. target_modules=")[1].rstrip("."))  # a Python list literal
        assert suggested and ("convInit.conv" in suggested) is thin
        get_peft_model(fresh("segresnet"), make(suggested))  # ... and that list works
        if preset:
            get_peft_model(fresh("segresnet"), make(None))


def test_a_matched_module_of_another_type_is_named_with_its_type():
    seq = nn.Sequential(nn.InstanceNorm3d(4, affine=True), nn.Conv3d(4, 4, 3))
    with pytest.raises(TargetModulesError, match=r"target_modules=\['0'\] matched '0' \(InstanceNorm3d\), which "
                       r"tCURLoRA cannot adapt .*: name the layers to adapt instead, e.g. target_modules=\['1'\], or "
                       r"add '0' to exclude_modules\."):
        get_peft_model(seq, TCURLoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(TargetModulesError, match=r"matched '0' \(InstanceNorm3d\), which LoRA-PT cannot adapt .*"
                       r"Sequential has no such layer to name instead; train '0' in full through modules_to_save"):
        get_peft_model(nn.Sequential(nn.InstanceNorm3d(4, affine=True)), LoraPTConfig(r=1, target_modules=["0"]))
    # a block of a MONAI CNN: the convolutions inside it are suggested
    with pytest.raises(TargetModulesError, match=r"matched 'down_layers.0.1.conv1' \(Convolution\).*HyPS cannot "
                       r"adapt.*name the layers inside instead, e.g. target_modules=\['conv1.conv'\]"):
        get_peft_model(fresh("segresnet"), HyPSConfig(target_modules=["conv1"]))


def test_a_network_without_preset_is_told_which_names_work():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv3d(1, 8, 3)  # 1 input channel: r <= 1 for the tensor methods
            self.body = nn.Conv3d(8, 8, 3)

    with pytest.raises(TargetModulesError, match=r"tCURLoRA has no default targets for Net \(presets exist for UNETR"
                       r".*AttentionUnet\): pass target_modules naming the layers to adapt, e.g. "
                       r"target_modules=\['body'\]\."):
        get_peft_model(Net(), TCURLoraConfig(r=2))
    get_peft_model(Net(), TCURLoraConfig(r=2, target_modules=["body"]))


@pytest.mark.parametrize("make, name", [(TCURLoraConfig, "tCURLoRA"), (LoraPTConfig, "LoRA-PT"), (HyPSConfig, "HyPS")])
def test_messages_use_the_method_names_of_the_readme(make, name):
    messages = []
    for target in (["attn.qkv"], ["0"]):
        with pytest.raises(TargetModulesError) as err:
            get_peft_model(nn.Sequential(nn.InstanceNorm3d(4), nn.Conv3d(4, 4, 3)), make(r=1, target_modules=target))
        messages.append(str(err.value))
    with pytest.raises(Exception) as err:
        make(r=1, target_modules=[])
    messages.append(str(err.value))
    for message in messages:
        assert message.startswith(name) and "TCURLora " not in message and "LoraPT " not in message, message


def test_cnn_defaults_train_and_merge_exactly_at_the_rank_they_allow():
    """The whole-network CNN default (every k>1 convolution) at r=1: an exact identity at init, it trains, and its
    merge is the adapted network."""
    base = fresh("segresnet")
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        before = base(x)
    model = get_peft_model(base, TCURLoraConfig(r=1))
    with torch.no_grad():
        assert torch.equal(model(x), before)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(x).square().mean().backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        after = model(x)
        assert not torch.equal(after, before)
        torch.testing.assert_close(model.merge_and_unload()(x), after, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config_cls", [TCURLoraConfig, LoraPTConfig])
def test_cnn_preset_at_default_rank_caps_thin_layers_and_records_it(config_cls, tmp_path):
    """A CNN's preset names its 1-channel input convolution, which no r=8 group fits: with target_modules=None the
    default rank_cap=None caps it (one warning naming it), the saved config records rank_cap=True, and the same
    explicit list without rank_cap is refused with the way out."""
    import json

    from peft_tensor.errors import RankError

    with pytest.warns(UserWarning, match="convInit.conv") as record:
        model = get_peft_model(fresh("segresnet"), config_cls())
    assert sum("capped" in str(w.message) or "cap" in str(w.message) for w in record) >= 1
    assert model.peft_config["default"].rank_cap is True
    model.save_pretrained(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["rank_cap"] is True
    explicit = list(model.peft_config["default"].target_modules)
    with pytest.raises(RankError, match="rank_cap=True"):
        get_peft_model(fresh("segresnet"), config_cls(target_modules=explicit))
