"""tCURLoRA's core coordinates (``TCURLoraConfig.basis``): the paper's form (default) and 'orthonormal'.

The orthonormal form trains U' in ``D = s (C Wc) * U' * (Wr R)`` (``C Wc`` and ``Wr R`` t-orthonormal, ``U'`` zero at
init); the paper's trains ``U`` in ``D = s C * (U - U0) * R`` with ``U0`` the intersection's pseudo-inverse. Same
updates, other coordinates: see docs/methods.md#tcurlora-core-coordinates.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_tensor import TCURLoraConfig
from peft_tensor.algebra import t_identity, t_product, t_transpose
from tests._models import UNETR_TARGETS, tiny_unetr
from tests._numerics import UNETR_DEPTH, assert_float32_close


def _config(**kw):
    return TCURLoraConfig(r=4, target_modules=UNETR_TARGETS, **kw)


def _x():
    return torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))


def _groups(model):
    return list(model.base_model.tcurlora_groups["default"])


@pytest.fixture(scope="module")
def base():
    return tiny_unetr(0, img=16)


@pytest.mark.parametrize("basis", ["orthonormal", "paper"])
def test_identity_at_init_and_every_core_gets_a_gradient(base, basis):
    model = get_peft_model(copy.deepcopy(base), _config(basis=basis))
    x = _x()
    with torch.no_grad():
        assert torch.equal(model(x), base(x))
    model(x).square().mean().backward()
    for g in _groups(model):
        assert g.tcurlora_core.grad is not None and float(g.tcurlora_core.grad.abs().max()) > 0, g.name


def test_default_is_the_paper_form_and_orthonormal_is_selectable(base):
    assert _config().basis == "paper"
    # a config file written before the field existed was trained in the paper's coordinates
    assert TCURLoraConfig(r=4, target_modules=UNETR_TARGETS, peft_tensor_version="0.1.0").basis == "paper"
    with pytest.raises(Exception, match="basis"):
        _config(basis="qr")
    paper = _groups(get_peft_model(copy.deepcopy(base), _config(basis="paper")))
    ortho = _groups(get_peft_model(copy.deepcopy(base), _config(basis="orthonormal")))
    for p, o in zip(paper, ortho):
        assert not hasattr(p, "col_whiten")
        assert float(p.tcurlora_core_init.abs().max()) > 0  # U0, the pseudo-inverse of the intersection
        assert torch.equal(o.tcurlora_core, torch.zeros_like(o.tcurlora_core))  # U' starts at zero
        assert torch.equal(p.col_idx, o.col_idx) and torch.equal(p.row_idx, o.row_idx)  # the same C and R


def test_orthonormal_factors_are_t_orthonormal_and_span_the_paper_updates(base):
    (g,) = _groups(get_peft_model(copy.deepcopy(base), TCURLoraConfig(r=4, target_modules=["attn.out_proj"],
                                                                      basis="orthonormal")))
    eye = t_identity(4, g.n_slices, dtype=torch.float64)
    q_c = t_product(g.cols.double(), g.col_whiten.double())
    q_r = t_product(g.row_whiten.double(), g.rows.double())
    assert float((t_product(t_transpose(q_c), q_c) - eye).abs().max()) < 1e-5
    assert float((t_product(q_r, t_transpose(q_r)) - eye).abs().max()) < 1e-5
    # a core U' is the paper's U - U0 = Wc * U' * Wr: the update is the paper's form of that core
    with torch.no_grad():
        g.tcurlora_core.copy_(torch.randn(g.tcurlora_core.shape, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        a, b = g.factors()[0]
        core = t_product(t_product(g.col_whiten.double(), g.tcurlora_core.double()), g.row_whiten.double())
        paper = g.scale() * t_product(t_product(g.cols.double(), core), g.rows.double())
    torch.testing.assert_close(t_product(a.double(), b.double()), paper, rtol=1e-4,
                               atol=1e-6 * float(paper.abs().max()))
    # core_scale='auto': a unit step on every core entry moves the weights by about their rms
    weights = torch.cat([g.cols.flatten(), g.rows.flatten()]).double()
    ratio = float(paper.pow(2).mean().sqrt() / weights.pow(2).mean().sqrt())
    assert 0.5 < ratio < 2.0, ratio


def test_merge_equals_unmerged_and_save_load_is_exact_without_decomposition(base, tmp_path, request):
    model = get_peft_model(copy.deepcopy(base), _config(init_weights=False, basis="orthonormal"))
    x = _x()
    with torch.no_grad():
        expected = model(x)
        assert not torch.allclose(expected, base(x), atol=1e-3)  # a non-trivial adapter
    model.save_pretrained(tmp_path)
    request.getfixturevalue("no_decomposition")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert loaded.peft_config["default"].basis == "orthonormal"
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
        merged = loaded.merge_and_unload()
        assert_float32_close(merged(x), expected, depth=UNETR_DEPTH)


@pytest.mark.parametrize("basis", ["orthonormal", "paper"])
def test_weight_decay_alone_keeps_the_orthonormal_adapter_at_the_identity(base, basis):
    """Why the paper's coordinates learn slowly where the data gradient is small: Adam's coupled weight decay pulls the
    trainable core towards zero, and the paper's core starts at U0, so the update drifts to ``-s C U0 R`` (the
    adapter removes the weights' CUR part) at the full learning rate. The orthonormal core starts at zero: weight
    decay keeps it at the identity."""
    model = get_peft_model(copy.deepcopy(base), _config(basis=basis))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=0.1, weight_decay=2e-5, amsgrad=True)
    x = _x()
    for _ in range(3):
        opt.zero_grad()
        (0.0 * model(x).sum()).backward()  # no data gradient: only the weight decay term
        opt.step()
    with torch.no_grad():
        moved = float((model(x) - base(x)).abs().max())
    if basis == "orthonormal":
        assert moved == 0.0
    else:
        assert moved > 1e-3
