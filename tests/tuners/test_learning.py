"""Methods that learn at their default settings (issue 13, section 1).

* each method's adapter alone, at its default config and its registry learning rate, moves a UNETR's output in a few
  Adam steps by a measurable fraction of what PEFT LoRA r=8 does at the recipes' learning rate;
* tCURLoRA's and LoRA-PT's scales: exact identity at init, the papers' unscaled form at ``1.0``, old configs load
  unscaled, tCURLoRA's ``auto`` scale makes the step relative to the weights' size;
* LoRA-PT stays finite under PEFT's generic-suite setting (plain SGD, lr 0.5) wherever LoRA r=8 does;
* HyPS: no serial ``Down`` is dead on arrival on UNETR (``attn.out_proj`` included).
"""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from peft_tensor import HyPSConfig, LoraPTConfig, TCURLoraConfig
from peft_tensor.algebra import t_product
from peft_tensor.registry import get_method

from tests._models import UNETR_TARGETS, tiny_unetr

RECIPE_LR = 3e-3  # optim.lr of the CPU recipes (finetune_cpu, demo): the decoder/head and PEFT LoRA train at it


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.rand(1, 1, 32, 32, 32, generator=g), torch.randint(0, 2, (1, 32, 32, 32), generator=g)


def _relative_output_change(config, lr: float, steps: int = 5) -> float:
    """Adam on the adapter alone (decoder and head frozen) for ``steps`` steps on a fixed batch."""
    model = get_peft_model(tiny_unetr(0), config)
    x, target = _inputs()
    with torch.no_grad():
        y0 = model(x)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), target).backward()
        opt.step()
    with torch.no_grad():
        return float((model(x) - y0).norm() / y0.norm())


_DEFAULTS = {
    "tcurlora": lambda: TCURLoraConfig(r=8, target_modules=UNETR_TARGETS, grouping="by_shape"),
    "lorapt": lambda: LoraPTConfig(r=8, target_modules=UNETR_TARGETS, grouping="by_shape"),
    "hyps": lambda: HyPSConfig(target_modules=UNETR_TARGETS),
}


@pytest.fixture(scope="module")
def lora_change():
    return _relative_output_change(LoraConfig(r=8, lora_alpha=16, target_modules=UNETR_TARGETS), RECIPE_LR)


@pytest.mark.parametrize("method", sorted(_DEFAULTS))
def test_adapter_alone_moves_the_output_at_default_settings(method, lora_change):
    """Threshold: a quarter of LoRA r=8's change in the same 5 steps (LoRA: ~0.19 relative change of the logits).
    Measured at the defaults: tCURLoRA, LoRA-PT and HyPS all reach 0.2-0.3; a method whose factors do not move (the
    failure of issue 13, where tCURLoRA's core stayed put at the recipes' lr) stays near 0."""
    lr = get_method(method).lr or RECIPE_LR
    change = _relative_output_change(_DEFAULTS[method](), lr)
    assert lora_change > 0.05
    assert change > 0.25 * lora_change, (method, lr, change, lora_change)


@pytest.mark.parametrize("method", sorted(_DEFAULTS))
def test_adapter_alone_moves_the_output_in_the_recipes_form(method, lora_change):
    """The recipes' form of each method on UNETR (the registry's arm defaults for it: tCURLoRA r=16 in the
    orthonormal core with the paper's grouping, LoRA-PT r=32 with core_gain 0.2, HyPS as configured) at the registry
    rate an arm gets: the same threshold."""
    spec = get_method(method)
    defaults = spec.defaults_for("unetr")
    config = spec.config_cls(target_modules=UNETR_TARGETS, **defaults)
    lr = spec.lr_for(defaults) or RECIPE_LR
    change = _relative_output_change(config, lr)
    assert change > 0.25 * lora_change, (method, defaults, lr, change, lora_change)


@pytest.mark.parametrize("method", sorted(_DEFAULTS))
def test_the_recipes_form_still_moves_the_output_at_its_with_decoder_rate(method, lora_change):
    """With the decoder training, the recipes train an adapter at DECODER_RATE_FACTOR x its adapter-alone rate, and
    PEFT LoRA at its own (3e-3, the rate of ``lora_change``): at that rate each method's recipe form must still move
    the output by a quarter of LoRA's change in the same 5 steps, not sit still while the decoder learns."""
    from peft_tensor.training.arms import optimizer_settings

    spec = get_method(method)
    defaults = spec.defaults_for("unetr")
    config = spec.config_cls(target_modules=UNETR_TARGETS, **defaults)
    lr = optimizer_settings({"name": method})["method_lr"]
    lora_lr = optimizer_settings({"name": "lora"})["method_lr"]
    assert lr < spec.lr_for(defaults) and lora_lr == RECIPE_LR  # the with-decoder rates
    change = _relative_output_change(config, lr)
    assert change > 0.25 * lora_change, (method, lr, change, lora_change)


@pytest.mark.parametrize("make", [
    lambda **kw: TCURLoraConfig(r=4, target_modules=UNETR_TARGETS, grouping="by_shape", **kw),
    lambda **kw: LoraPTConfig(r=4, target_modules=UNETR_TARGETS, grouping="by_shape", **kw),
])
@pytest.mark.parametrize("scale", [None, 1.0, 3.0])
def test_scaled_adapters_are_an_exact_identity_at_init(make, scale):
    field = "core_scale" if make().peft_type == "TCURLORA" else "factor_scale"
    config = make(**({} if scale is None else {field: scale}))
    base = tiny_unetr(0)
    x, _ = _inputs()
    with torch.no_grad():
        y_base = base(x)
        y = get_peft_model(base, config)(x)
    assert torch.equal(y, y_base)


def _groups(model, cls_name):
    return [m for m in model.modules() if type(m).__name__ == cls_name]


def test_tcurlora_scale_paper_form_and_relative_step():
    # core_scale=1.0 is the paper's W + C * (U - U0) * R; other values multiply that update
    # each model's update against the paper's form computed from that same model's C, U - U0 and R
    deltas, papers = {}, {}
    for scale in (1.0, 2.5):
        model = get_peft_model(tiny_unetr(0), TCURLoraConfig(r=4, target_modules=["attn.out_proj"],
                                                             core_scale=scale, basis="paper"))
        (group,) = _groups(model, "TCURLoraGroup")
        with torch.no_grad():
            group.tcurlora_core.add_(0.01 * torch.randn(group.tcurlora_core.shape, generator=torch.Generator()
                                                        .manual_seed(0)))
        a, b = group.factors()[0]
        deltas[scale] = t_product(a, b)
        papers[scale] = t_product(t_product(group.cols, group.tcurlora_core - group.tcurlora_core_init), group.rows)
    torch.testing.assert_close(deltas[1.0], papers[1.0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(deltas[2.5], 2.5 * papers[2.5], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(deltas[2.5], papers[2.5], rtol=1e-3), "core_scale=2.5 must change the update"

    # 'auto': a unit core step changes the weights by about their rms, whatever the weights' scale (W -> cW)
    scales = []
    for c in (1.0, 10.0):
        base = tiny_unetr(0)
        with torch.no_grad():
            for m in base.modules():
                if isinstance(m, nn.Linear):
                    m.weight.mul_(c)
        model = get_peft_model(base, TCURLoraConfig(r=8, target_modules=UNETR_TARGETS, grouping="by_shape",
                                                    basis="paper"))
        groups = _groups(model, "TCURLoraGroup")
        scales.append([g.scale() for g in groups])
        for g in groups:
            step = torch.randn(g.tcurlora_core.shape, generator=torch.Generator().manual_seed(0))
            delta = t_product(t_product(g.cols.double(), g.scale() * step.double()), g.rows.double())
            weights = torch.cat([g.cols.flatten(), g.rows.flatten()]).double()
            ratio = float(delta.pow(2).mean().sqrt() / weights.pow(2).mean().sqrt())
            assert 0.5 < ratio < 2.0, ratio
    for s1, s10 in zip(*scales):
        assert math.isclose(s10, s1 / 10, rel_tol=1e-4)


def test_configs_from_before_the_scales_load_unscaled():
    """A config file written before core_scale / factor_scale existed carries peft_tensor_version and lacks the
    field: it was trained unscaled and must load as 1.0. New configs get 'auto' and save it explicitly."""
    old = TCURLoraConfig(r=8, target_modules=["attn.qkv"], peft_tensor_version="0.1.0")
    assert old.core_scale == 1.0
    assert TCURLoraConfig(r=8, target_modules=["attn.qkv"]).core_scale == "auto"
    assert LoraPTConfig(r=8, target_modules=["attn.qkv"], peft_tensor_version="0.1.0").factor_scale == 1.0
    assert LoraPTConfig(r=8, target_modules=["attn.qkv"]).factor_scale == "auto"
    assert TCURLoraConfig(r=8, target_modules=["attn.qkv"]).to_dict()["core_scale"] == "auto"
    with pytest.raises(Exception, match="core_scale"):
        TCURLoraConfig(r=8, target_modules=["attn.qkv"], core_scale=0)
    with pytest.raises(Exception, match="factor_scale"):
        LoraPTConfig(r=8, target_modules=["attn.qkv"], factor_scale="big")


class _PeftSuiteMLP(nn.Module):
    """PEFT's test ``MLP`` (tests/test_custom_models.py): lin0 10->20, ReLU, dropout, lin1 20->2, log-softmax."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(X.float())))))


def _finite_after_suite_sgd(config, seed: int) -> bool:
    """PEFT's suite: SGD lr 0.5, 3 steps of loss = output.sum() on X = arange(90).view(9, 10)."""
    torch.manual_seed(seed)
    model = get_peft_model(_PeftSuiteMLP(), config)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(torch.arange(90).view(9, 10)).sum().backward()
        opt.step()
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize("targets", [["lin0"], ["lin0", "lin1"]])
@pytest.mark.parametrize("core", ["full", "diagonal"])
def test_lorapt_stays_finite_under_peft_suite_sgd_where_lora_does(targets, core):
    seeds = range(4)
    assert all(_finite_after_suite_sgd(LoraConfig(r=8, target_modules=targets), s) for s in seeds)
    assert all(_finite_after_suite_sgd(LoraPTConfig(r=2, core=core, target_modules=targets), s) for s in seeds)


def test_lorapt_unscaled_paper_form_is_what_diverged():
    """Documents why factor_scale='auto' is the default: the unscaled form overflows in that setting."""
    config = LoraPTConfig(r=2, target_modules=["lin0", "lin1"], factor_scale=1.0)
    assert not all(_finite_after_suite_sgd(config, s) for s in range(4))


@pytest.mark.parametrize("seed", [0, 1])
def test_hyps_serial_down_is_never_dead_on_arrival_on_unetr(seed):
    """Every serial Down (attn.qkv, attn.out_proj, mlp.linear1/2 of all 12 blocks) gets a non-zero gradient within
    the first steps on a real forward pass at init. With independent Kaiming rows 8-11 of 48 were dead."""
    model = get_peft_model(tiny_unetr(seed), HyPSConfig(target_modules=UNETR_TARGETS))
    downs = {n: m for n, m in model.named_modules() if n.endswith("hyps_down.default")}
    assert len(downs) == 48 and any(".attn.out_proj." in n for n in downs)
    for m in downs.values():  # mirrored pairs (w, -w)
        assert torch.equal(m.weight[1::2], -m.weight[0::2])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x, target = _inputs()
    seen = dict.fromkeys(downs, 0.0)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), target).backward()
        for n, m in downs.items():
            seen[n] += float(m.weight.grad.abs().sum()) if m.weight.grad is not None else 0.0
        opt.step()
    dead = [n for n, v in seen.items() if v == 0.0]
    assert not dead, dead


def test_lorapt_core_gain_scales_only_the_core_update_and_old_configs_keep_one():
    """``core_gain`` multiplies the core's update ``S - S0`` and nothing else: an adapter at gain g computes what an
    adapter at gain 1 computes with ``S - S0`` scaled by g (U and V as they are); configs written before the field
    load with 1.0; a bad value is refused by name."""
    assert LoraPTConfig(r=8, target_modules=["attn.qkv"], peft_tensor_version="0.1.0").core_gain == 1.0
    for bad in (0, -0.5, float("nan"), "big", True, None):
        with pytest.raises(Exception, match="core_gain must be a positive number"):
            LoraPTConfig(r=8, target_modules=["attn.qkv"], core_gain=bad)
    x, _ = _inputs()
    models = {}
    for gain in (1.0, 0.2):
        torch.manual_seed(0)
        models[gain] = get_peft_model(tiny_unetr(0), LoraPTConfig(r=2, target_modules=UNETR_TARGETS, grouping="paper",
                                                                 core_gain=gain, init_weights=False))
    one, low = models[1.0], models[0.2]
    with torch.no_grad():
        for g1, g2 in zip(one.base_model.groups("default"), low.base_model.groups("default")):
            assert g2.scales() == (g1.scales()[0], g1.scales()[1] * 0.2)
            # the same U, V and the core update S - S0 five times larger at gain 0.2: the same adapter
            g2.lorapt_S.copy_(g1.lorapt_S_init + (g1.lorapt_S - g1.lorapt_S_init) / 0.2)
        y1, y2 = one(x), low(x)
    with one.disable_adapter():
        base = one(x)
    assert (y1 - base).abs().max() > 1e-4  # the adapter does something
    torch.testing.assert_close(y2, y1, rtol=1e-4, atol=1e-5)
    # every factor still receives a gradient at gain 0.2
    low(x).square().mean().backward()
    grads = {n: p.grad for n, p in low.named_parameters() if p.requires_grad and "lorapt_" in n}
    assert grads and all(g is not None and g.abs().max() > 0 for g in grads.values())


class _Spread(nn.Module):
    """Four 16 x 16 Linears (one LoRA-PT group) whose singular values fall by 0.3x per component (random singular
    vectors): a principal part with a wide spread, as pretrained weights have. ``rank`` < 16 zeroes the rest and
    gives all four the same singular vectors, so every Fourier slice has that rank too."""

    def __init__(self, rank: int = 16):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        s = 8.0 * 0.3 ** torch.arange(16.0)
        s[rank:] = 0.0
        self.lins = nn.ModuleList(nn.Linear(16, 16, bias=False) for _ in range(4))
        with torch.no_grad():
            for k, lin in enumerate(self.lins):
                if rank == 16 or k == 0:
                    q1, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
                    q2, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
                lin.weight.copy_((1.0 + 0.1 * k) * q1 @ torch.diag(s) @ q2.T)

    def forward(self, x):
        for lin in self.lins:
            x = torch.tanh(lin(x))
        return x


_SPREAD_TARGETS = ["lins.0", "lins.1", "lins.2", "lins.3"]


def _column_gains(mode: str) -> list[float]:
    """|D|_F after moving each column of U by the same unit tube (the others at their initial values)."""
    model = get_peft_model(_Spread(), LoraPTConfig(r=4, target_modules=_SPREAD_TARGETS, factor_scale=mode))
    (group,) = model.base_model.groups("default")
    step = torch.randn(group.lorapt_U.shape[:2], generator=torch.Generator().manual_seed(3))
    gains = []
    with torch.no_grad():
        for i in range(group.rank):
            group.lorapt_U.copy_(group.lorapt_U_init)
            group.lorapt_U[:, :, i] += step / step.norm()
            gains.append(float(group.dense_delta().norm()))
    return gains


def test_lorapt_per_component_scale_gives_every_principal_component_the_same_gain():
    """``factor_scale='per_component'`` scales column ``i`` of ``U`` and ``V`` by ``c / sigma_i`` (``sigma_i``: the
    component's largest Fourier-slice singular value), so the same step on any column moves the weights as much;
    with ``'auto'`` (``c / sigma_1`` for all) the columns of the smaller components move them less."""
    net = _Spread()
    stacked = torch.stack([lin.weight.detach().double() for lin in net.lins])
    sigma = torch.linalg.svdvals(torch.fft.rfft(stacked, dim=0))[:, :4].amax(0)  # independent of the package's SVD
    model = get_peft_model(net, LoraPTConfig(r=4, target_modules=_SPREAD_TARGETS, factor_scale="per_component"))
    (group,) = model.base_model.groups("default")
    a, a_s = group.scales()
    c = group.AUTO_GAIN
    torch.testing.assert_close(a, c / sigma, rtol=1e-4, atol=0)
    assert a_s == c and float(sigma[0] / sigma[-1]) > 2  # the spread this test is about
    auto, per_component = _column_gains("auto"), _column_gains("per_component")
    assert max(auto) / min(auto) > 2, auto
    assert max(per_component) / min(per_component) < 1.15, per_component
    assert math.isclose(per_component[0], auto[0], rel_tol=1e-5)  # the principal column: c / sigma_1 either way


def test_lorapt_per_component_scale_floors_vanishing_components():
    """Rank-deficient weights: components with (near-)zero singular values are amplified at most 1 / COMPONENT_FLOOR
    times the principal one's scale, never divided by zero; training stays finite."""
    model = get_peft_model(_Spread(rank=2), LoraPTConfig(r=4, target_modules=_SPREAD_TARGETS,
                                                         factor_scale="per_component"))
    (group,) = model.base_model.groups("default")
    a, _ = group.scales()
    assert bool(torch.isfinite(a).all())
    torch.testing.assert_close(a[2:], a[0].expand(2) / group.COMPONENT_FLOOR, rtol=1e-6, atol=0)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    with pytest.raises(Exception, match="factor_scale must be 'auto' or 'per_component' or a positive number"):
        LoraPTConfig(r=4, target_modules=_SPREAD_TARGETS, factor_scale="per_column")
