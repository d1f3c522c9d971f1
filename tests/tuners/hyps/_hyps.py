"""Helpers shared by the HyPS tests (test_hyps.py, test_hyps_conv.py, test_hyps_swinunetr.py in this folder; their
one-thread fixture is in conftest.py)."""

from __future__ import annotations

import torch

from peft_tensor.tuners.hyps import HyPSLayer


def loss(y, seed=7):
    """Mean squared error to a fixed random target (computed in float32 whatever ``y``'s dtype)."""
    target = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y)
    return ((y.float() - target.float()) ** 2).mean()


def hyps_layers(model):
    return [m for m in model.modules() if isinstance(m, HyPSLayer)]


def named_hyps_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, HyPSLayer)}


def check_gradients(model, *, first_step: bool = False, where: str = ""):
    """After a backward pass: no frozen parameter has a gradient, every trainable one a non-zero gradient. On the
    first step the serial branch's Down is exempt: Up starts at zero, so Down's very first gradient is exactly zero
    (as LoRA's A)."""
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, f"frozen {n} received a gradient"
        elif not first_step or "hyps_down" not in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {n}{where}"


def train_two_steps(pm, x, y0, *, lr: float, seed: int = 7):
    """Two Adam steps on ``loss(pm(x), seed)``: the output at init is ``y0`` to the bit (identity), and every
    gradient is checked after each backward (:func:`check_gradients`). Returns the trained output in eval mode."""
    pm.train()
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=lr)
    y = pm(x)
    torch.testing.assert_close(y.detach(), y0, atol=0, rtol=0)  # identity at init
    for step in range(2):
        if step:
            y = pm(x)
        loss(y, seed).backward()
        check_gradients(pm, first_step=step == 0, where=f" (step {step})")
        opt.step()
        opt.zero_grad()
    pm.eval()
    with torch.no_grad():
        return pm(x)
