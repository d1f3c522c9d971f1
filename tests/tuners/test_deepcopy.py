"""``copy.deepcopy`` of an adapted model after training steps (an EMA or mean-teacher copy, as done with PEFT LoRA):
the copy gives the same outputs, is independent of the original (its own parameters, caches and forward hooks), and
trains; unloading it leaves the original intact."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model

from tests.tuners.test_conv import basic_unet
from tests.tuners.test_dense_linear import Blocks
from tests.tuners.test_inference_mode import CONV, LINEAR


def _check(make_model, config, x):
    pm = get_peft_model(make_model(), config())
    pm.eval()  # batch norm: no running-statistics updates, so outputs compare exactly
    with torch.no_grad():
        y0 = pm(x)
    pm(x).pow(2).mean().backward()  # the per-forward caches now hold non-leaf tensors
    cp = copy.deepcopy(pm)
    with torch.no_grad():
        torch.testing.assert_close(cp(x), y0, rtol=0, atol=0)
        for p in cp.parameters():
            if p.requires_grad:
                p.add_(0.05)
        assert not torch.allclose(cp(x), y0)
        torch.testing.assert_close(pm(x), y0, rtol=0, atol=0)  # the original does not see the copy's parameters
    cp.zero_grad()
    cp(x).pow(2).mean().backward()
    trainable = [p for p in cp.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    cp.unload()
    with torch.no_grad():
        torch.testing.assert_close(pm(x), y0, rtol=0, atol=0)


@pytest.mark.parametrize("case", sorted(LINEAR))
def test_deepcopy_after_training(case):
    _check(Blocks, LINEAR[case], torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("case", sorted(CONV))
def test_deepcopy_of_a_conv_adapter_after_training(case):
    _check(basic_unet, CONV[case], torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1)))
