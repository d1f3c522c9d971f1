"""Review defects where tCURLoRA / LoRA-PT differed silently from PEFT LoRA (review items 1-7 of the core issue).

Net: three ``nn.Linear(8, 8)`` with tanh in between (``l1``, ``l2``, ``l3``), float64, every Linear targeted,
``init_weights=False`` so that the adapters are not the identity.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from peft_tensor import LoraPTConfig, TCURLoraConfig
from peft_tensor.errors import AdapterLoadError

TARGETS = ["l1", "l2", "l3"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().double()


def _x(seed: int = 1) -> torch.Tensor:
    return torch.randn(5, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


CONFIGS = {
    "tcurlora": lambda **kw: TCURLoraConfig(r=3, target_modules=TARGETS, init_weights=False, **kw),
    "lorapt": lambda **kw: LoraPTConfig(r=2, target_modules=TARGETS, init_weights=False, **kw),
}


def _peft(method: str, seed: int = 0, **kw):
    torch.manual_seed(100 + seed)
    return get_peft_model(_net(seed), CONFIGS[method](**kw))


# -- A (item 5): a file that lacks a key the group needs is refused, never loaded as an untrained adapter ----------
MISSING = {"tcurlora": ["group_shape", "tcurlora_core_init", "col_idx", "tcurlora_core"],
           "lorapt": ["group_shape", "lorapt_U_init", "lorapt_S"]}


@pytest.mark.parametrize("method,key", [(m, k) for m, keys in MISSING.items() for k in keys])
def test_load_refuses_file_missing_group_key(method, key, tmp_path):
    pm = _peft(method)
    pm.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    sd = load_file(path)
    dropped = [k for k in sd if k.endswith("." + key)]
    assert dropped, sorted(sd)
    save_file({k: v for k, v in sd.items() if k not in dropped}, path)
    with pytest.raises(AdapterLoadError, match=key):
        PeftModel.from_pretrained(_net(), tmp_path)


class Net2(Net):
    """Three groups by shape (8x8, 6x8, 8x6)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(8, 8)
        self.l2 = nn.Linear(8, 6)
        self.l3 = nn.Linear(6, 8)


def test_load_refuses_file_missing_whole_group(tmp_path):
    # the file keeps only the first group's tensors
    torch.manual_seed(0)
    pm = get_peft_model(Net2().double(), TCURLoraConfig(r=3, target_modules=TARGETS, init_weights=False,
                                                        grouping="by_shape"))
    assert len(pm.base_model.groups("default")) >= 2
    pm.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    sd = load_file(path)
    keep = {k: v for k, v in sd.items() if ".tcurlora_groups.0." in k}
    save_file(keep, path)
    torch.manual_seed(0)
    with pytest.raises(AdapterLoadError, match=r"tcurlora_groups\.default\.1\.tcurlora_core"):
        PeftModel.from_pretrained(Net2().double(), tmp_path)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_complete_file_still_loads_exactly(method, tmp_path):
    pm = _peft(method)
    x = _x()
    expected = pm(x)
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_net(), tmp_path)
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


# -- B (item 4): add_weighted_adapter of adapters with different configs is the exact weighted sum ------------------
WEIGHTED = {
    "tcurlora": [dict(core_scale=1.0), dict(core_scale="auto")],
    "lorapt": [dict(factor_scale=1.0), dict(factor_scale="auto", core="diagonal", core_gain=0.2)],
}


@pytest.mark.parametrize("method", list(CONFIGS))
def test_weighted_adapter_across_configs_is_exact(method):
    _assert_weighted_is_exact(method, *WEIGHTED[method])


def test_weighted_lorapt_with_per_component_scales_is_exact():
    """The per-column scales of factor_scale='per_component' are baked into the combined factors as 'auto''s are."""
    _assert_weighted_is_exact("lorapt", dict(factor_scale="per_component"),
                              dict(factor_scale="per_component", core="diagonal", core_gain=0.2))
    _assert_weighted_is_exact("lorapt", dict(factor_scale=1.0), dict(factor_scale="per_component"))


def _assert_weighted_is_exact(method, first, second):
    torch.manual_seed(5)
    pm = get_peft_model(_net(), CONFIGS[method](**first), adapter_name="first")
    torch.manual_seed(6)
    pm.add_adapter("second", CONFIGS[method](**second))
    weights = [0.7, -1.3]
    pm.base_model.add_weighted_adapter(["first", "second"], weights, "mix")
    for name in TARGETS:
        layer = pm.base_model.model.get_submodule(name)
        expected = weights[0] * layer.get_delta_weight("first") + weights[1] * layer.get_delta_weight("second")
        got = layer.get_delta_weight("mix")
        assert got.dtype == torch.float64
        assert expected.abs().max() > 1e-3
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


# -- C (item 3): tCURLoRA's C and R follow the base weights; a load onto a different base warns -------------------
def _new_weights(net: nn.Module, seed: int = 7, rel: float = 0.5) -> dict:
    """New base weights: each tensor moved by ``rel`` of its Frobenius norm in a random direction."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in TARGETS:
        sd = net.get_submodule(name).state_dict()
        out[name] = {}
        for k, v in sd.items():
            noise = torch.randn(v.shape, generator=g, dtype=v.dtype)
            out[name][k] = v + rel * v.norm() / noise.norm() * noise
    return out


def test_tcurlora_base_weights_replaced_then_saved_and_loaded(tmp_path):
    pm = _peft("tcurlora")
    new = _new_weights(_net())
    for name in TARGETS:  # the user restores a checkpoint into the wrapped network's base layers
        pm.base_model.model.get_submodule(name).base_layer.load_state_dict(new[name])
    x = _x()
    y = pm(x)
    pm.save_pretrained(tmp_path)
    base = _net()
    for name in TARGETS:
        base.get_submodule(name).load_state_dict(new[name])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same base: no warning
        loaded = PeftModel.from_pretrained(base, tmp_path)
    torch.testing.assert_close(loaded(x), y, rtol=0, atol=0)


def test_tcurlora_load_onto_different_base_warns(tmp_path):
    pm = _peft("tcurlora")
    pm.save_pretrained(tmp_path)
    base = _net()
    for name, sd in _new_weights(base, rel=0.01).items():
        base.get_submodule(name).load_state_dict(sd)
    with pytest.warns(UserWarning, match=r"base.*relative difference"):
        PeftModel.from_pretrained(base, tmp_path)


def test_tcurlora_old_file_without_fingerprint_loads(tmp_path):
    pm = _peft("tcurlora")
    x = _x()
    y = pm(x)
    pm.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    sd = load_file(path)
    save_file({k: v for k, v in sd.items() if "fingerprint" not in k}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = PeftModel.from_pretrained(_net(), tmp_path)
    torch.testing.assert_close(loaded(x), y, rtol=0, atol=0)


def test_tcurlora_fingerprint_matches_the_files_written_before_it_was_sped_up():
    """Saved adapters carry the fingerprint of the original formula (float64 random-sign projections of C and R,
    signs drawn from one seeded generator, C's first); today's cheaper sums must agree with it, or every adapter saved
    before them warns on load."""
    pm = _peft("tcurlora")
    for group in pm.base_model.groups("default"):
        c, r = group.cols, group.rows
        g = torch.Generator().manual_seed(20250101)
        k = group.FINGERPRINT_PROBES
        signs_c = (torch.randint(0, 2, (k, *c.shape), generator=g) * 2 - 1).to(torch.float64)
        signs_r = (torch.randint(0, 2, (k, *r.shape), generator=g) * 2 - 1).to(torch.float64)
        before = torch.stack([torch.einsum("lij,klij->k", c.double(), signs_c),
                              torch.einsum("lij,klij->k", r.double(), signs_r)])
        now = group.base_fingerprint.view(torch.float64)
        rel = float((now - before).norm() / before.norm())
        assert rel < 1e-5 < group.FINGERPRINT_RTOL, rel


# -- D (item 6): a tensor frozen between forward and backward ---------------------------------------------------------
@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("delta_mode", ["factored", "dense"])
def test_freeze_between_forward_and_backward(method, delta_mode):
    x = _x()
    grads = []
    for freeze in (False, True):
        torch.manual_seed(0)
        net = Net2().double()  # three groups: tCURLoRA has other cores than the frozen one
        torch.manual_seed(100)
        pm = get_peft_model(net, CONFIGS[method](delta_mode=delta_mode, grouping="by_shape"))
        params = [p for p in pm.base_model.groups("default").parameters()]
        assert len(params) >= 3
        extra = pm.base_model.model.l1.base_layer.bias  # a second tensor whose gradient must be unaffected
        extra.requires_grad_(True)
        loss = (pm(x) ** 2).sum()
        if freeze:
            params[0].requires_grad_(False)
        loss.backward()
        if freeze:
            assert params[0].grad is None  # as for any frozen leaf (PEFT LoRA)
        grads.append([p.grad for p in params[1:]] + [extra.grad])
    for a, b in zip(*grads):
        assert a is not None and b is not None
        torch.testing.assert_close(b, a, rtol=0, atol=0)


# -- E (item 1): second-order gradients (MAML) ------------------------------------------------------------------------
def _maml_objective(pm, names, values, x, lr):
    params = dict(zip(names, values))
    out = torch.func.functional_call(pm, params, (x,))
    inner = (out ** 2).mean()
    g = torch.autograd.grad(inner, values, create_graph=True)
    fast = {n: v - lr * gv for n, v, gv in zip(names, values, g)}
    out2 = torch.func.functional_call(pm, fast, (x + 0.5,))
    return (torch.sin(out2) ** 2).mean()


SECOND_ORDER = [("tcurlora", {}), ("lorapt", {}), ("tcurlora", {"delta_mode": "dense"}),
                ("lorapt", {"delta_mode": "dense"}), ("lorapt", {"frozen_term": "dense"})]


@pytest.mark.parametrize("method,kw", SECOND_ORDER, ids=[f"{m}-{'-'.join(kw.values()) or 'factored'}"
                                                         for m, kw in SECOND_ORDER])
def test_second_order_gradient_matches_finite_difference(method, kw):
    """MAML: the outer gradient through ``p - lr * grad(inner loss)`` (create_graph=True) equals a float64 central
    difference (before the fix: exactly the first-order gradient, 1e-4 off; dense mode: torch's
    once_differentiable error)."""
    pm = _peft(method, **kw)
    x = _x()
    named = [(n, p) for n, p in pm.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    values = [p.detach().clone().requires_grad_(True) for _, p in named]
    lr = 0.5
    outer = _maml_objective(pm, names, values, x, lr)
    grad = torch.autograd.grad(outer, values)
    g = torch.Generator().manual_seed(3)
    direction = [torch.randn(v.shape, generator=g, dtype=v.dtype) for v in values]
    analytic = sum((gv * d).sum() for gv, d in zip(grad, direction))
    eps = 1e-5

    def at(sign):
        vals = [(v.detach() + sign * eps * d).requires_grad_(True) for v, d in zip(values, direction)]
        return float(_maml_objective(pm, names, vals, x, lr).detach())

    numeric = (at(1) - at(-1)) / (2 * eps)
    assert abs(float(analytic) - numeric) <= 1e-6 * max(1.0, abs(numeric)), (float(analytic), numeric)


# -- item 2: an input-gradient penalty (double backward w.r.t. the input) ------------------------------------------
@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("mode", ["factored", "dense"])
def test_input_gradient_penalty_matches_finite_difference(method, mode):
    """``gx = grad(loss, x, create_graph=True)``, then ``gx.square().sum()`` differentiated w.r.t. the adapter:
    compared with a central difference of that penalty (float64)."""
    pm = _peft(method, delta_mode=mode)
    x = _x().requires_grad_(True)
    param = next(p for p in pm.parameters() if p.requires_grad)

    def penalty():
        loss = torch.sin(pm(x)).sum()
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        return gx.square().sum()

    (got,) = torch.autograd.grad(penalty(), param)
    direction = torch.randn(param.shape, generator=torch.Generator().manual_seed(3), dtype=param.dtype)
    eps = 1e-6
    with torch.no_grad():
        param.add_(eps * direction)
    up = penalty().item()
    with torch.no_grad():
        param.sub_(2 * eps * direction)
    down = penalty().item()
    with torch.no_grad():
        param.add_(eps * direction)
    fd = (up - down) / (2 * eps)
    assert abs(float((got * direction).sum()) - fd) <= 1e-6 * max(1.0, abs(fd))


# -- item 7 and after: whatever changes between forward and backward, the gradient is that of the forward -----------
def _assert_edit_between_forward_and_backward_keeps_gradients(method: str, edit, **kw) -> None:
    """Gradients of one forward/backward equal those of a twin where ``edit(pm)`` runs between the two."""
    x = _x()
    grads = []
    for do_edit in (False, True):
        pm = _peft(method, **kw)
        params = [p for p in pm.parameters() if p.requires_grad]
        loss = torch.sin(pm(x)).sum()
        if do_edit:
            edit(pm)
        loss.backward()
        grads.append([p.grad.clone() for p in params])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def _rebind_trainable(pm) -> None:
    for p in [p for p in pm.parameters() if p.requires_grad]:
        p.data = p.data * 1.5 + 0.1


def _rebind_group_buffers(pm) -> None:
    for group in pm.base_model.groups("default"):
        for buf in group.buffers(recurse=False):
            if buf.is_floating_point():
                buf.data = buf.data * 1.5 + 0.25


def _rebind_base_weights(pm) -> None:
    for name in TARGETS:  # .data: an in-place edit of a weight autograd saved raises, as for PEFT LoRA
        weight = getattr(pm.base_model.model, name).base_layer.weight
        weight.data = weight.data * 1.5


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("mode", ["factored", "dense"])
def test_data_rebinding_between_forward_and_backward_keeps_the_forward_gradient(method, mode):
    """As for PEFT LoRA (autograd keeps the forward's tensors): ``p.data = other`` after the forward does not change
    the gradient of that forward."""
    _assert_edit_between_forward_and_backward_keeps_gradients(method, _rebind_trainable, delta_mode=mode)


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("mode", ["factored", "dense"])
def test_buffer_rebinding_between_forward_and_backward_keeps_the_forward_gradient(method, mode):
    """Nothing the backward recomputes from is read from the module at backward time: rebinding every float buffer
    of the groups (``.data = other``) after the forward leaves that forward's gradients unchanged."""
    _assert_edit_between_forward_and_backward_keeps_gradients(method, _rebind_group_buffers, delta_mode=mode)


def test_tcurlora_base_weights_restored_between_forward_and_backward_keep_the_forward_gradient():
    """A checkpoint restored into the base layers after the forward (C and R are then re-gathered for the next
    forward) does not change the gradient of the forward that already ran."""
    _assert_edit_between_forward_and_backward_keeps_gradients("tcurlora", _rebind_base_weights)
