"""delta_mode='dense' through peft_tensor/tuners/_dense_linear.py: the memory-lean linear (x (W + D_k)^T + b saving
only x) and the per-forward D of a group (FFT along the slice axis, a node that saves nothing). Exactness against
autograd (float64 gradcheck), against the factored path (same function and gradients) and what is saved for
backward."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from torch import nn

from peft_tensor import LoraPTConfig, TCURLoraConfig
from peft_tensor.algebra import from_fourier
from peft_tensor.tuners._dense_linear import (DenseDeltaLinear, dense_linear, from_fourier_adjoint, group_dense,
                                              group_dense_slices)

TARGETS = ["attn.qkv", "attn.out_proj", "mlp.linear1", "mlp.linear2"]
CONFIGS = {
    "tcurlora": lambda **kw: TCURLoraConfig(r=3, target_modules=TARGETS, **kw),
    "lorapt": lambda **kw: LoraPTConfig(r=2, target_modules=TARGETS, **kw),
}


class Blocks(nn.Module):
    """MONAI transformer blocks (module names ``blocks.N.attn.qkv`` ... as inside UNETR), 3 blocks: the paper
    grouping gives an attention tensor of L = 12 slices and MLP tensors of L = 3 (even and odd slice counts)."""

    def __init__(self, n: int = 3, hidden: int = 32, mlp: int = 48, heads: int = 4, seed: int = 0) -> None:
        super().__init__()
        from monai.networks.blocks import TransformerBlock

        torch.manual_seed(seed)
        self.blocks = nn.ModuleList(TransformerBlock(hidden, mlp, heads, 0.0, qkv_bias=False) for _ in range(n))

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return x


def _model(method: str, mode: str, grouping: str = "paper", **kw):
    return get_peft_model(Blocks(), CONFIGS[method](grouping=grouping, delta_mode=mode, **kw))


def _x(shape=(2, 7, 32), seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _trainable(pm):
    return [p for p in pm.parameters() if p.requires_grad]


# -- the linear -----------------------------------------------------------------------------------------------------
def _linear_inputs(dtype, weight_grad=True):
    gen = torch.Generator().manual_seed(0)

    def r(*shape, grad=True):
        return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_(grad)

    x, weight, bias = r(2, 3, 5), r(6, 5, grad=weight_grad), r(6)
    slices = [r(2, 5), r(2, 5), r(2, 5), r(6, 5)]  # adapter a: 3 slices of 2 rows; adapter b: one slice of 6 rows
    return x, weight, bias, (3, 1), slices


def test_dense_linear_gradcheck_float64():
    x, weight, bias, counts, slices = _linear_inputs(torch.float64)
    assert torch.autograd.gradcheck(lambda x, w, b, *s: DenseDeltaLinear.apply(x, w, b, counts, *s),
                                    (x, weight, bias, *slices))


def test_dense_linear_equals_f_linear_of_the_sum_and_saves_no_weight_sized_tensor():
    x, weight, bias, counts, slices = _linear_inputs(torch.float32, weight_grad=False)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = dense_linear(x, weight, bias, counts, slices)
    held = {t.untyped_storage().data_ptr() for t in (x, weight, *slices)}
    assert {t.untyped_storage().data_ptr() for t in saved} <= held  # x and references only, no W + D

    ref_inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in (x, weight, bias, *slices)]
    rx, rw, rb, *rs = ref_inputs
    ref = F.linear(rx, rw + torch.cat(rs[:3]) + rs[3], rb)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    for got, want in zip((x, bias, *slices), (rx, rb, *rs)):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-6)
    assert weight.grad is None  # a frozen base weight gets no gradient (and none is computed)
    with pytest.raises(ValueError, match="do not add up"):
        dense_linear(x, weight, bias, (3,), slices)


def test_dense_linear_under_bf16_autocast_matches_f_linear():
    x, weight, bias, counts, slices = _linear_inputs(torch.float32, weight_grad=False)
    rx, rb, *rs = [t.detach().clone().requires_grad_() for t in (x, bias, *slices)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = dense_linear(x, weight, bias, counts, slices)
        ref = F.linear(rx, weight + torch.cat(rs[:3]) + rs[3], rb)
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    y.float().sum().backward()
    ref.float().sum().backward()
    for got, want in zip((x, bias, *slices), (rx, rb, *rs)):
        assert got.grad.dtype == want.grad.dtype
        torch.testing.assert_close(got.grad, want.grad, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("n_slices", [1, 2, 5, 6])
def test_from_fourier_adjoint_is_the_backward_of_the_inverse_rfft(n_slices):
    x_hat = torch.randn(n_slices // 2 + 1, 3, 4, dtype=torch.complex128, requires_grad=True)
    y = from_fourier(x_hat, n_slices)
    g = torch.randn_like(y)
    (want,) = torch.autograd.grad(y, x_hat, g)
    torch.testing.assert_close(from_fourier_adjoint(g, n_slices), want, rtol=0, atol=1e-14)


# -- a group's D and the adapted model ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("grouping", ["paper", "by_shape"])
def test_dense_mode_is_the_factored_function_with_the_same_gradients(method, grouping):
    x = _x()
    results = {}
    for mode in ("factored", "dense"):
        pm = _model(method, mode, grouping, init_weights=False)
        if mode == "dense":
            assert {g.n_slices for g in pm.base_model.groups("default")} >= ({3, 12} if grouping == "paper" else {3})
        y = pm(x)
        (y ** 2).mean().backward()
        results[mode] = (y.detach(), [p.grad for p in _trainable(pm)])
    torch.testing.assert_close(results["dense"][0], results["factored"][0], rtol=1e-5, atol=1e-5)
    for g_dense, g_factored in zip(results["dense"][1], results["factored"][1]):
        scale = g_factored.abs().max().item()
        assert scale > 0
        torch.testing.assert_close(g_dense, g_factored, rtol=0, atol=2e-4 * scale)
    identity = _model(method, "dense")
    with torch.no_grad():
        adapted = identity(x)
        with identity.disable_adapter():
            assert torch.equal(adapted, identity(x))  # D is exactly zero at init: bit-exact identity


def test_dense_mode_saves_no_weight_sized_tensor_per_layer_and_holds_one_d_per_group():
    x = _x()
    pm = _model("tcurlora", "dense", init_weights=False)
    groups = list(pm.base_model.groups("default"))
    resident = {t.untyped_storage().data_ptr() for t in (*pm.parameters(), *pm.buffers(), x)}
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = pm(x)
    d_storages = {g._live["dense_lean"][2][0].untyped_storage().data_ptr() for g in groups}
    assert len(d_storages) == len(groups)  # one D per group, each built once in this forward
    smallest_weight = min(m.weight.numel() * 4 for m in pm.modules() if isinstance(m, nn.Linear))
    big = {p for p, n in saved.items() if n >= smallest_weight and p not in resident}
    assert big <= d_storages, "a weight-sized tensor other than a group's D was saved for backward"
    (y ** 2).mean().backward()

    # the next forward drops the previous D before building its own
    old = weakref.ref(groups[0]._live["dense_lean"][2][0])
    pm(x)
    assert old() is None


def test_group_d_node_saves_nothing_and_can_be_traversed_by_two_backward_passes():
    pm = _model("lorapt", "dense", init_weights=False)
    group = pm.base_model.groups("default")[0]
    params = [p for p in group.parameters() if p.requires_grad]
    d = group_dense(group)
    c1, c2 = torch.randn_like(d), torch.randn_like(d)
    (d * c1).sum().backward()  # no retain_graph: the D node saved nothing that could be freed
    (d * c2).sum().backward()
    both = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    (group_dense(group) * (c1 + c2)).sum().backward()
    for got, want in zip(both, [p.grad for p in params]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())
    # outside a model forward the slices are fresh each call (nothing cached that could go stale)
    assert group_dense_slices(group)[0] is not group_dense_slices(group)[0]


# -- LoRA-PT frozen_term='dense': W - P0 held once per layer ---------------------------------------------------------
@pytest.mark.parametrize("delta_mode", ["factored", "dense"])
def test_lorapt_frozen_term_dense_is_the_same_adapter(delta_mode, tmp_path):
    x = _x()
    ref = _model("lorapt", "factored", init_weights=False)
    pm = _model("lorapt", delta_mode, init_weights=False, frozen_term="dense")
    y_ref, y = ref(x), pm(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    (y_ref ** 2).mean().backward()
    (y ** 2).mean().backward()
    for g, g_ref in zip([p.grad for p in _trainable(pm)], [p.grad for p in _trainable(ref)]):
        torch.testing.assert_close(g, g_ref, rtol=0, atol=2e-4 * g_ref.abs().max().item())
    group = pm.base_model.groups("default")[0]
    assert group.term_ranks() == (group.rank,)  # one factored term left
    # W - P0 held once per Linear of the group (one weight-sized copy, no -P0 besides), never saved
    folded = group.__dict__["_folded"]
    layers = {id(layer): layer for layer, _, _ in group._sources}
    assert set(folded) == set(layers) and group.__dict__.get("_p0") is None
    assert not any("p0" in k or "folded" in k for k in pm.state_dict())
    minus_p0 = group.frozen_dense(hold=False)
    for k, (layer, r0, r1) in enumerate(group._sources):
        w = layer.get_base_layer().weight
        torch.testing.assert_close(folded[id(layer)][1][r0:r1], w[r0:r1] + minus_p0[k], rtol=0, atol=1e-6)
    assert group.__dict__.get("_p0") is None  # hold=False kept nothing
    with torch.no_grad():
        with pm.disable_adapter():
            base = pm(x)
        with ref.disable_adapter():
            torch.testing.assert_close(ref(x), base, rtol=0, atol=0)  # the base weights are untouched
        pm.eval()
        mixed = pm(x, adapter_names=["default", "__base__"])  # the non-dense path applies -P0 by a matmul
        torch.testing.assert_close(mixed[0], y[0].detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mixed[1], base[1], rtol=0, atol=0)
        pm.save_pretrained(tmp_path)
        pm.merge_adapter()
        assert not group.__dict__["_folded"]  # W was rewritten through .data: the held W - P0 is dropped
        torch.testing.assert_close(pm(x), y.detach(), rtol=1e-4, atol=1e-5)
        pm.unmerge_adapter()
        torch.testing.assert_close(pm(x), y.detach(), rtol=1e-4, atol=1e-5)
        loaded = PeftModel.from_pretrained(Blocks(), tmp_path)
        assert loaded.peft_config["default"].frozen_term == "dense"
        torch.testing.assert_close(loaded(x), y.detach(), rtol=0, atol=0)


def test_lorapt_frozen_term_dense_follows_the_base_weight():
    """The held W - P0 is rebuilt when the base weight changes (an in-place edit, a dtype cast), and a base weight
    that trains is not folded: its gradient is the factored adapter's."""
    x = _x()
    ref = _model("lorapt", "factored", init_weights=False)
    pm = _model("lorapt", "factored", init_weights=False, frozen_term="dense")
    torch.testing.assert_close(pm(x), ref(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        for model in (ref, pm):
            model.base_model.model.blocks[1].attn.qkv.base_layer.weight.mul_(1.5)
    torch.testing.assert_close(pm(x), ref(x), rtol=1e-5, atol=1e-5)
    for model in (ref, pm):
        model.base_model.model.blocks[0].mlp.linear1.base_layer.weight.requires_grad_(True)
    (ref(x) ** 2).mean().backward()
    (pm(x) ** 2).mean().backward()
    w_ref = ref.base_model.model.blocks[0].mlp.linear1.base_layer.weight
    w = pm.base_model.model.blocks[0].mlp.linear1.base_layer.weight
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-4, atol=1e-6)
    pm.base_model.model.to(torch.bfloat16)
    ref.base_model.model.to(torch.bfloat16)
    with torch.no_grad():
        want, got = ref(x.bfloat16()).float(), pm(x.bfloat16()).float()
    torch.testing.assert_close(got, want, rtol=0, atol=0.05 * want.abs().max().item())
    folded = pm.base_model.groups("default")[0].__dict__["_folded"]
    assert {v[1].dtype for v in folded.values()} == {torch.bfloat16}


def test_auto_delta_mode_follows_the_per_device_cost_weight(monkeypatch):
    """delta_mode='auto': a device type without a cost weight (CPU, as measured) runs factored; with one, the flop
    comparison decides per group and per call (many tokens favour dense, few favour factored)."""
    from peft_tensor.tuners.tensor_group import TensorGroup

    pm = _model("tcurlora", "auto", init_weights=False)
    groups = list(pm.base_model.groups("default"))
    assert "cpu" not in TensorGroup.DENSE_COST_SCALE
    assert not any(g.prefers_dense(10 ** 6) for g in groups)
    monkeypatch.setitem(TensorGroup.DENSE_COST_SCALE, "cpu", 1.0)
    assert all(g.prefers_dense(10 ** 6) for g in groups) and not any(g.prefers_dense(1) for g in groups)
    x = _x((2, 700, 32))  # 1400 tokens: dense for every group of these small weights
    assert all(g.prefers_dense(1400) for g in groups)
    y = pm(x)
    assert all("dense_lean" in g._live for g in groups)
    monkeypatch.setitem(TensorGroup.DENSE_COST_SCALE, "cpu", 1e9)
    torch.testing.assert_close(pm(x), y, rtol=1e-5, atol=1e-5)  # factored now: the same function
