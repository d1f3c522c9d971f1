"""Networks by ``_target_`` class path: presets of targets and decoder sets per MONAI network class, build_model /
defaults_for / load_backbone of the recipes on ``_target_`` configs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peft_tensor.networks import NetworkSpecError, preset_for, spec_of
from peft_tensor.networks.specs import DECODER_SETS, resolve_class_path
from peft_tensor.training.models import build_model, defaults_for, load_backbone, model_kwargs

from ._nets import NETS, SWIN, UNETR, VIT_KW, build, expected_targets, same_tensors, swin_kwargs, unetr_kwargs

VIT = "monai.networks.nets.ViT"
CASES = {**NETS, "vit": (VIT, VIT_KW)}  # NETS' ViT is the classifier


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


@pytest.mark.parametrize("case", sorted(CASES))
def test_presets_name_real_layers(case):
    class_path, kwargs = CASES[case]
    net = build(class_path, kwargs)
    preset = preset_for(class_path, kwargs)
    modules = dict(net.named_modules())
    expected = expected_targets(case if case in NETS else "vit", net)  # transformer Linears / k>1 convolutions
    hits = {n for n in modules for target in preset.target_modules if _matches(n, target)}
    assert hits == expected
    for target in preset.target_modules:  # each entry names layers, only adaptable ones
        assert any(_matches(n, target) for n in modules), target
    for name in DECODER_SETS:
        for module in preset.decoder_set(name):
            assert module in modules, (name, module)
    trained = set(preset.decoder_set("paper"))
    assert not any(_matches(n, t) for n in trained for t in preset.target_modules)  # decoder and targets disjoint


def test_presets_agree_with_the_name_configs():
    for name, class_path in (("unetr", UNETR), ("swinunetr", SWIN)):
        for decoder in DECODER_SETS:
            by_name = defaults_for({"name": name}, decoder)
            by_target = defaults_for({"_target_": class_path, "in_channels": 1, "out_channels": 2}, decoder)
            assert by_name == by_target, (name, decoder)
    assert defaults_for({"name": "unetr"})["decoder"] == ["decoder2", "decoder3", "decoder4", "decoder5",
                                                          "out.conv.conv"]


def test_unknown_classes_get_targets_by_name_or_a_pointer_to_conv_targets():
    class Block(nn.Module):
        def __init__(self, width: int = 8):
            super().__init__()
            self.attn = nn.Module()
            self.attn.qkv = nn.Linear(width, 3 * width)
            self.mlp = nn.Module()
            self.mlp.linear1 = nn.Linear(width, width)

    import types
    import sys

    mod = types.ModuleType("tests_networks_custom")
    mod.Block = Block
    sys.modules["tests_networks_custom"] = mod
    try:
        preset = preset_for("tests_networks_custom.Block", {"width": 4})
        assert preset.target_modules == ("attn.qkv", "mlp.linear1") and preset.decoder_set("paper") == []
    finally:
        del sys.modules["tests_networks_custom"]
    with pytest.raises(NetworkSpecError, match=r"SegResNetDS has no target preset \(presets: UNETR, .*\): pass "
                       r"target_modules naming the layers to adapt, e.g. \['encoder.conv_init', 'blocks.0.conv1'"):
        preset_for("monai.networks.nets.SegResNetDS", {"spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                                                       "init_filters": 8, "blocks_down": [1, 1]})


def test_build_model_by_target(tmp_path):
    net = build_model({"_target_": "SwinUNETR", **swin_kwargs(use_v2=True), "pretrained": None})
    assert type(net).__name__ == "SwinUNETR" and any("layers1c" in n for n, _ in net.named_modules())
    assert spec_of(net) == {"_target_": SWIN, **swin_kwargs(use_v2=True)}  # recorded: adapters name their base
    assert model_kwargs({"_target_": "unetr", **unetr_kwargs()}) == (UNETR, unetr_kwargs())
    assert resolve_class_path("ViT") == VIT
    with pytest.raises(ValueError, match="not a torch.nn.Module class"):
        build_model({"_target_": "collections.OrderedDict"})
    with pytest.raises(ValueError, match="full path"):
        build_model({"_target_": "NoSuchNet"})
    legacy = build_model({"name": "unetr", "img_size": 16, "feature_size": 8, "hidden_size": 96, "mlp_dim": 192,
                          "num_heads": 4})
    assert type(legacy).__name__ == "UNETR"


def test_load_backbone_takes_any_source(tmp_path):
    """The recipes' model.pretrained: a checkpoint file into build_model(cfg), a bundle with overrides from cfg."""
    from .test_load import _write_bundle

    src = build(UNETR, unetr_kwargs(), seed=1)
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "w.pth")
    cfg = {"_target_": UNETR, **unetr_kwargs(), "pretrained": str(tmp_path / "w.pth")}
    net, used = load_backbone(cfg["pretrained"], cfg)
    assert same_tensors(src.state_dict(), net.state_dict()) and used["_target_"] == UNETR
    legacy = {"name": "unetr", "img_size": 16, "feature_size": 8, "hidden_size": 96, "mlp_dim": 192, "num_heads": 4,
              "dropout_rate": 0.0}
    net, _ = load_backbone(tmp_path / "w.pth", legacy)
    assert same_tensors(src.state_dict(), net.state_dict())
    bundle = _write_bundle(tmp_path / "bundle", {"_target_": "UNETR", **unetr_kwargs()}, src.state_dict())
    net, used = load_backbone(bundle, {"_target_": UNETR, "out_channels": 3})
    assert net.out.conv.conv.out_channels == 3 and used["out_channels"] == 3
    with pytest.raises(ValueError, match="SwinUNETR"):
        load_backbone(bundle, {"name": "swinunetr"})


def test_a_backbone_folder_takes_a_new_head(tmp_path, capsys):
    """A binary-pretrained backbone folder fine-tuned on a K-class task: everything loads but the head, which is
    freshly initialised and reported; any other architecture difference stays an error."""
    from peft_tensor.training.models import save_backbone

    legacy = {"name": "unetr", "img_size": 16, "feature_size": 8, "hidden_size": 96, "mlp_dim": 192, "num_heads": 4,
              "dropout_rate": 0.0, "out_channels": 2}
    torch.manual_seed(0)
    src = build_model(legacy)
    save_backbone(src, legacy, tmp_path / "bb")
    net, used = load_backbone(tmp_path / "bb", {**legacy, "out_channels": 3})
    assert used["out_channels"] == 3 and net.out.conv.conv.out_channels == 3
    mine, theirs = net.state_dict(), src.state_dict()
    head = {k for k in theirs if k.startswith("out.")}
    assert head and all(torch.equal(mine[k], theirs[k]) for k in theirs if k not in head)
    assert "out.conv.conv.weight" in capsys.readouterr().out  # the report names the re-initialised head
    with pytest.raises(ValueError, match="differs from model config"):
        load_backbone(tmp_path / "bb", {**legacy, "hidden_size": 48, "num_heads": 4})
