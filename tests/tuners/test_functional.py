"""Trainable tensors the adapter does not hold itself reach its gradients, as with PEFT LoRA:
``torch.func.functional_call`` with substituted (non-leaf) tensors, as in MAML-style or hypernetwork training, and a
parametrization (``torch.nn.utils.parametrize``) on an adapter tensor. The tensor groups recompute their factors in
backward, so they must bind the tensors the forward saw (these gradients used to be silently ``None``)."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch.func import functional_call
from torch.nn.utils import parametrize

from tests.tuners._helpers import trainable_params
from tests.tuners.test_dense_linear import Blocks
from tests.tuners.test_inference_mode import LINEAR


def _x():
    return torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", sorted(LINEAR))
def test_functional_call_with_substituted_tensors_gets_their_gradients(case):
    x = _x()
    model, twin = get_peft_model(Blocks(), LINEAR[case]()), get_peft_model(Blocks(), LINEAR[case]())
    gen = torch.Generator().manual_seed(2)
    leaves = {n: (p.detach() + 0.01 * torch.randn(p.shape, generator=gen)).requires_grad_(True)
              for n, p in trainable_params(model).items()}
    substituted = {n: leaf * 1.0 for n, leaf in leaves.items()}  # non-leaf, as a MAML inner step gives
    functional_call(model, substituted, (x,)).pow(2).mean().backward()
    with torch.no_grad():
        for n, p in trainable_params(twin).items():
            p.copy_(leaves[n])
    twin(x).pow(2).mean().backward()
    assert all(p.grad is None for p in trainable_params(model).values())  # the module's own tensors are not involved
    for n, p in trainable_params(twin).items():
        assert leaves[n].grad is not None, n
        torch.testing.assert_close(leaves[n].grad, p.grad, rtol=1e-5, atol=1e-7, msg=n)


class _Double(torch.nn.Module):
    def forward(self, t):
        return 2 * t


@pytest.mark.parametrize("case", sorted(LINEAR))
def test_parametrized_adapter_tensor_gets_its_gradient(case):
    x = _x()
    model, twin = get_peft_model(Blocks(), LINEAR[case]()), get_peft_model(Blocks(), LINEAR[case]())
    name = next(iter(trainable_params(model)))
    owner_name, _, leaf = name.rpartition(".")
    owner, twin_owner = model.get_submodule(owner_name), twin.get_submodule(owner_name)
    parametrize.register_parametrization(owner, leaf, _Double())
    with torch.no_grad():
        getattr(twin_owner, leaf).mul_(2)
    y, y_twin = model(x), twin(x)
    torch.testing.assert_close(y, y_twin, rtol=0, atol=0)
    y.pow(2).mean().backward()
    y_twin.pow(2).mean().backward()
    original = owner.parametrizations[leaf].original
    assert original.grad is not None
    torch.testing.assert_close(original.grad, 2 * getattr(twin_owner, leaf).grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", sorted(LINEAR))
def test_float64_model_is_differentiated_in_float64(case):
    """After ``model.to(torch.float64)`` the update is computed in float64 (as LoRA's is): central differences on a
    few entries of every trainable tensor agree with the gradients to float64 precision (float32 factors gave
    relative errors of 0.06-0.99 here)."""
    x = _x().double()
    model = get_peft_model(Blocks(), LINEAR[case]()).to(torch.float64)

    def loss():
        return model(x).pow(2).mean()

    loss().backward()
    eps = 1e-6
    for name, p in trainable_params(model).items():
        assert p.dtype == torch.float64
        for i in torch.randperm(p.numel(), generator=torch.Generator().manual_seed(0))[:3].tolist():
            ix = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), p.shape))
            with torch.no_grad():
                p.data[ix] += eps
                up = loss().item()
                p.data[ix] -= 2 * eps
                down = loss().item()
                p.data[ix] += eps
            numeric = (up - down) / (2 * eps)
            assert abs(numeric - p.grad[ix].item()) <= 1e-6 * max(abs(numeric), 1e-3), (name, ix, numeric)


@pytest.mark.parametrize("case", ["tcurlora", "tcurlora-dense", "lorapt"])
def test_torch_func_transforms_are_refused_with_a_clear_error(case):
    model = get_peft_model(Blocks(), LINEAR[case]())
    params = {n: p.detach() for n, p in trainable_params(model).items()}

    def loss(p):
        return functional_call(model, p, (_x(),)).pow(2).mean()

    with pytest.raises(NotImplementedError, match="does not support torch.func transforms"):
        torch.func.grad(loss)(params)
    loss(params)  # plain calls still work after the refusal


@pytest.mark.parametrize("case", ["lora", "hyps"])
def test_torch_func_grad_works_where_it_does_for_lora(case):
    model = get_peft_model(Blocks(), LINEAR[case]())
    params = {n: p.detach() for n, p in trainable_params(model).items()}
    grads = torch.func.grad(lambda p: functional_call(model, p, (_x(),)).pow(2).mean())(params)
    assert set(grads) == set(params) and all(torch.isfinite(g).all() for g in grads.values())
