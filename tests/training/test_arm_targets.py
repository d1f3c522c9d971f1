"""The recipes' arms read the arm's own ``target_modules`` / ``modules_to_save`` first and the network's preset only
for what is missing: a ``_target_`` CNN fine-tunes with an explicit target list and with the default preset, and a
network without a preset fine-tunes with an explicit list."""

from __future__ import annotations

import logging

import pytest
import torch

from peft_tensor._peft_compat import BaseTunerLayer
from peft_tensor.errors import TargetModulesError
from peft_tensor.training import apply_arm, build_model, param_counts
from peft_tensor.training.arms import peft_config
from peft_tensor.tuners._targets import targets_from_preset

SEGRESNET = {"_target_": "monai.networks.nets.SegResNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
             "init_filters": 8, "blocks_down": [1, 1], "blocks_up": [1]}
# a MONAI CNN without a preset (not a SegResNet subclass)
NO_PRESET = {"_target_": "monai.networks.nets.SegResNetDS", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
             "init_filters": 8, "blocks_down": [1, 1]}


def _adapted(model) -> list[str]:
    return [n for n, m in model.get_base_model().named_modules() if isinstance(m, BaseTunerLayer)]


def _one_step_trains(model) -> None:
    x = torch.randn(1, 1, 8, 8, 8)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = model(x)
    (out[0] if isinstance(out, (list, tuple)) else out).square().mean().backward()
    opt.step()
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])]
    assert moved and any("tcurlora_" in n or "hyps_" in n for n in moved), moved


def test_a_target_cnn_fine_tunes_with_an_explicit_target_list():
    arm = {"name": "tcurlora", "r": 2, "target_modules": ["conv1.conv", "conv2.conv"]}  # the arm's list is read first
    model = apply_arm(build_model(SEGRESNET), arm, SEGRESNET)
    config = model.peft_config["default"]
    assert config.target_modules == ["conv1.conv", "conv2.conv"] and not targets_from_preset(config)
    assert config.modules_to_save == ["conv_final"]  # missing from the arm: the preset's
    assert _adapted(model) and all(n.endswith(("conv1.conv", "conv2.conv")) for n in _adapted(model))
    _one_step_trains(model)


def test_a_target_cnn_fine_tunes_with_the_default_preset():
    for arm, r in (({"name": "hyps"}, 2), ({"name": "tcurlora", "r": 1}, 1)):
        model = apply_arm(build_model(SEGRESNET), arm, SEGRESNET)
        config = model.peft_config["default"]
        assert targets_from_preset(config) and config.r == r  # the tuner took the preset (target_modules=None)
        assert "convInit.conv" in _adapted(model) and "down_layers.1.0.conv" in _adapted(model)
        assert not any(n.startswith("up_samples") for n in _adapted(model))  # 1x1x1: not in the preset
        _one_step_trains(model)
    own = apply_arm(build_model(SEGRESNET), {"name": "hyps", "modules_to_save": []}, SEGRESNET)
    assert not own.peft_config["default"].modules_to_save  # the arm's own (empty) list wins over the preset's head
    frozen = apply_arm(build_model(SEGRESNET), "frozen", SEGRESNET)  # the head arm: the preset's head set
    assert {n.split(".")[0] for n, p in frozen.named_parameters() if p.requires_grad} == {"conv_final"}


def test_a_network_without_preset_fine_tunes_with_its_own_target_list(caplog):
    arm = {"name": "tcurlora", "r": 2, "target_modules": ["blocks.0.conv1", "blocks.0.conv2"]}
    with caplog.at_level(logging.WARNING):
        model = apply_arm(build_model(NO_PRESET), arm, NO_PRESET)
    assert "SegResNetDS has no preset: only the adapter trains; set arm.modules_to_save" in caplog.text
    assert not model.peft_config["default"].modules_to_save
    assert _adapted(model) and all(n.endswith(("blocks.0.conv1", "blocks.0.conv2")) for n in _adapted(model))
    assert param_counts(model)["trainable"] > 0
    _one_step_trains(model)
    # no list and no preset: say what to write, with names that fit the arm's r=8 (not the 1-channel input
    # convolution encoder.conv_init), never "use an arm <method>_full"
    caplog.clear()
    with caplog.at_level(logging.WARNING), pytest.raises(TargetModulesError) as err:
        apply_arm(build_model(NO_PRESET), {"name": "tcurlora", "r": 8, "decoder": "head"}, NO_PRESET)
    # the backbone's own arm defaults are looked up on the preset already read: one warning, not one per lookup
    assert caplog.text.count("has no preset") == 1
    message = str(err.value)
    assert message.startswith("tCURLoRA has no default targets for SegResNetDS (presets exist for UNETR")
    assert "pass target_modules naming the layers to adapt, e.g. target_modules=['blocks.0.conv1'" in message
    with pytest.raises(TargetModulesError) as err:  # at the recipes' r=16: only layers wide enough for it
        apply_arm(build_model(NO_PRESET), {"name": "tcurlora"}, NO_PRESET)
    assert "e.g. target_modules=['layers.1.blocks.0.conv1', 'layers.1.blocks.0.conv2']" in str(err.value)
    assert "conv_init" not in message and "_full" not in message
    with pytest.raises(ValueError) as err:  # PEFT's LoRA needs the list here
        peft_config("lora", {"name": "lora"}, NO_PRESET)
    message = str(err.value)
    assert "arm lora: SegResNetDS has no target preset" in message and "arm.target_modules" in message
    assert "_full" not in message
