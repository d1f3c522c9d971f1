"""Evaluating under ``torch.inference_mode()`` and then training on (a validation pass inside a training loop) works
as with PEFT LoRA: whatever an adapter keeps across forward passes (roll indices, frozen Fourier factors, LoRA-PT's
held ``-P0`` / ``W - P0``) is built as a normal tensor, so the next training step can save it for backward, and its
gradients equal those of a twin adapter that never ran in inference mode."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from peft_tensor import HyPSConfig, LoraPTConfig, TCURLoraConfig
from tests.tuners.test_conv import UNET_EXCLUDE, UNET_TARGETS, basic_unet
from tests.tuners.test_dense_linear import TARGETS, Blocks

LINEAR = {
    "lora": lambda: LoraConfig(r=2, target_modules=TARGETS, init_lora_weights=False),
    "tcurlora": lambda: TCURLoraConfig(r=3, target_modules=TARGETS, init_weights=False),
    "tcurlora-dense": lambda: TCURLoraConfig(r=3, target_modules=TARGETS, init_weights=False, delta_mode="dense"),
    "lorapt": lambda: LoraPTConfig(r=2, target_modules=TARGETS, init_weights=False),
    "lorapt-dense": lambda: LoraPTConfig(r=2, target_modules=TARGETS, init_weights=False, delta_mode="dense"),
    "lorapt-frozen-dense": lambda: LoraPTConfig(r=2, target_modules=TARGETS, init_weights=False,
                                                frozen_term="dense"),
    "hyps": lambda: HyPSConfig(r=2, d=2, target_modules=TARGETS, init_weights=False),
}
CONV = {
    "tcurlora-conv": lambda: TCURLoraConfig(r=2, target_modules=UNET_TARGETS, exclude_modules=UNET_EXCLUDE,
                                            init_weights=False),
    "lorapt-conv": lambda: LoraPTConfig(r=2, target_modules=UNET_TARGETS, exclude_modules=UNET_EXCLUDE,
                                        svd_method="full", init_weights=False, frozen_term="dense"),
    "hyps-conv": lambda: HyPSConfig(r=2, d=2, target_modules=UNET_TARGETS, exclude_modules=UNET_EXCLUDE,
                                    init_weights=False),
}


def _grads(model, x):
    model.zero_grad()
    model(x).pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _check(make_model, config, x):
    evaluated, twin = get_peft_model(make_model(), config()), get_peft_model(make_model(), config())
    with torch.no_grad():
        twin.eval()
        y_twin = twin(x)
    with torch.inference_mode():
        evaluated.eval()
        y_eval = evaluated(x)
        evaluated(x, adapter_names=["default"] * x.shape[0])  # the mixed-batch path keeps its own caches
    torch.testing.assert_close(y_eval, y_twin, rtol=0, atol=0)
    evaluated.train()
    twin.train()
    got, want = _grads(evaluated, x), _grads(twin, x)
    assert got and set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
    with torch.no_grad():
        evaluated.eval()
        twin.eval()
        torch.testing.assert_close(evaluated(x), twin(x), rtol=0, atol=0)  # batch norm: both updated once


@pytest.mark.parametrize("case", sorted(LINEAR))
def test_training_after_an_inference_mode_evaluation(case):
    _check(Blocks, LINEAR[case], torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("case", sorted(CONV))
def test_training_a_conv_adapter_after_an_inference_mode_evaluation(case):
    _check(basic_unet, CONV[case], torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1)))
