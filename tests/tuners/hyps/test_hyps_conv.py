"""HyPS on convolutions (Conv1d/2d/3d, ConvTranspose1d/2d/3d): the factored forward against a dense reference, counts
against an independent formula, the PEFT lifecycle on a small conv net, and a CNN-only MONAI network (BasicUNet).

SwinUNETR with decoder convolutions is in tests/tuners/hyps/test_hyps_swinunetr.py (it reuses that module's network).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

import peft_tensor.tuners.hyps  # noqa: F401  (registers HYPS with PEFT)
from peft_tensor.errors import MergeError, RankError, TargetModulesError
from peft_tensor.tuners.hyps import Conv, HyPSConfig, HyPSLayer
from tests.tuners.hyps._hyps import check_gradients, hyps_layers, loss, named_hyps_layers, train_two_steps


# --------------------------------------------------------------------------------- one layer, dense reference

# name -> (layer builder, input spatial shape, forward kwargs)
LAYERS = {
    "conv1d": (lambda: nn.Conv1d(3, 5, 3, stride=2, padding=1), (9,), {}),
    "conv2d_dilated_nobias": (lambda: nn.Conv2d(3, 5, (3, 2), padding=2, dilation=(2, 1), bias=False), (7, 6), {}),
    "conv3d_strided": (lambda: nn.Conv3d(3, 6, 3, stride=2, padding=1), (5, 6, 4), {}),
    "conv3d_same_reflect": (lambda: nn.Conv3d(3, 6, 3, padding="same", padding_mode="reflect"), (4, 5, 3), {}),
    "conv3d_1x1x1": (lambda: nn.Conv3d(4, 6, 1), (3, 2, 3), {}),
    "convT1d": (lambda: nn.ConvTranspose1d(4, 3, 3, stride=2, padding=1, output_padding=1), (5,), {}),
    "convT2d_dilated": (lambda: nn.ConvTranspose2d(4, 3, 3, stride=2, dilation=2, bias=False), (4, 3), {}),
    "convT3d_k2s2": (lambda: nn.ConvTranspose3d(6, 4, 2, stride=2), (3, 2, 4), {}),
    "convT3d_output_size": (lambda: nn.ConvTranspose3d(6, 4, 3, stride=2, padding=1), (3, 3, 2),
                            {"output_size": [6, 5, 4]}),
}


def _dense_reference(base: nn.Module, layer: HyPSLayer, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The HyPS output written out densely, independently of the factored forward: fold ``M + A B - A0 B0`` back into
    a kernel (``M`` the kernel as rows x cols), run the layer's own convolution with it, then the serial branch as an
    explicit channel contraction."""
    a, b = layer.hyps_A["default"], layer.hyps_B["default"]
    a0, b0 = layer.hyps_A0["default"], layer.hyps_B0["default"]
    w = base.weight
    kernel = (w.reshape(w.shape[0], -1) + a @ b - a0 @ b0).reshape(w.shape)
    dense = copy.deepcopy(base)
    dense.weight = nn.Parameter(kernel)
    h = dense(x, **kwargs)
    down = layer.hyps_down["default"].weight.reshape(layer.hyps_d["default"], -1)  # (d, out)
    up = layer.hyps_up["default"].weight.reshape(-1, layer.hyps_d["default"])  # (out, d)
    z = torch.relu(torch.einsum("dc,nc...->nd...", down, h))
    return h + layer.hyps_scale["default"] * torch.einsum("cd,nd...->nc...", up, z)


@pytest.mark.parametrize("name", list(LAYERS))
def test_conv_layer_identity_dense_reference_merge_and_count(name):
    build, spatial, kwargs = LAYERS[name]
    torch.manual_seed(0)
    base = build()
    x = torch.randn(2, base.in_channels, *spatial, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y0 = base(x, **kwargs)

    r, d = 2, 3
    pm = get_peft_model(nn.ModuleDict({"layer": copy.deepcopy(base)}),
                        HyPSConfig(target_modules=["layer"], r=r, d=d))
    layer = pm.base_model.model["layer"]
    assert isinstance(layer, Conv)
    with torch.no_grad():
        assert torch.equal(layer(x, **kwargs), y0), "HyPS must be an exact identity at initialisation"
    # Independent count: the kernel as a matrix is out x in*prod(k) (in x out*prod(k) when transposed); the parallel
    # branch holds r * (rows + cols), the serial one two 1x1x1 convolutions out -> d -> out.
    prod_k = math.prod(base.kernel_size)
    rows, cols = ((base.in_channels, base.out_channels * prod_k) if isinstance(base, nn.modules.conv._ConvTransposeNd)
                  else (base.out_channels, base.in_channels * prod_k))
    assert pm.get_nb_trainable_parameters()[0] == r * (rows + cols) + 2 * d * base.out_channels
    assert layer.hyps_A["default"].shape == (rows, r) and layer.hyps_B["default"].shape == (r, cols)
    assert layer.hyps_down["default"].weight.shape == (d, base.out_channels) + (1,) * len(spatial)
    # the initial factors are the truncated SVD of the kernel matrix
    u, s, vh = torch.linalg.svd(base.weight.detach().reshape(rows, cols).double(), full_matrices=False)
    torch.testing.assert_close((layer.hyps_A0["default"] @ layer.hyps_B0["default"]).double(),
                               (u[:, :r] * s[:r]) @ vh[:r], atol=1e-5, rtol=1e-5)

    torch.manual_seed(1)
    pm = get_peft_model(nn.ModuleDict({"layer": copy.deepcopy(base)}),
                        HyPSConfig(target_modules=["layer"], r=r, d=d, init_weights=False))
    layer = pm.base_model.model["layer"]
    with torch.no_grad():
        got = layer(x, **kwargs)
        torch.testing.assert_close(got, _dense_reference(base, layer, x, kwargs), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got, y0, atol=1e-3)

    parallel = get_peft_model(nn.ModuleDict({"layer": copy.deepcopy(base)}),
                              HyPSConfig(target_modules=["layer"], r=r, serial=False, init_weights=False))
    layer = parallel.base_model.model["layer"]
    with torch.no_grad():
        unmerged = layer(x, **kwargs).clone()
        parallel.merge_adapter(safe_merge=True)
        torch.testing.assert_close(layer(x, **kwargs), unmerged, atol=1e-5, rtol=1e-5)
        plain = parallel.merge_and_unload()["layer"]
        assert type(plain) is type(base)
        torch.testing.assert_close(plain(x, **kwargs), unmerged, atol=1e-5, rtol=1e-5)


def test_1x1x1_convolution_is_the_linear_hyps():
    """Same weights, same seed: a 1x1x1 Conv3d gets the same factors and the same output as the Linear."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    conv = nn.Conv3d(6, 5, 1)
    with torch.no_grad():
        conv.weight.copy_(lin.weight[:, :, None, None, None])
        conv.bias.copy_(lin.bias)
    cfg = dict(target_modules=["layer"], r=2, d=2, init_weights=False)
    torch.manual_seed(3)
    pl = get_peft_model(nn.ModuleDict({"layer": lin}), HyPSConfig(**cfg))
    torch.manual_seed(3)
    pc = get_peft_model(nn.ModuleDict({"layer": conv}), HyPSConfig(**cfg))
    ll, lc = pl.base_model.model["layer"], pc.base_model.model["layer"]
    for key in ("hyps_A", "hyps_B", "hyps_A0", "hyps_B0"):
        assert torch.equal(getattr(ll, key)["default"], getattr(lc, key)["default"]), key
    assert torch.equal(ll.hyps_down["default"].weight, lc.hyps_down["default"].weight.flatten(1))
    assert torch.equal(ll.hyps_up["default"].weight, lc.hyps_up["default"].weight.flatten(1))
    x = torch.randn(2, 6, 3, 2, 4)
    with torch.no_grad():
        torch.testing.assert_close(lc(x), ll(x.movedim(1, -1)).movedim(-1, 1), atol=1e-6, rtol=1e-6)


def test_serial_down_rows_are_mirrored_and_up_is_zero():
    pm = get_peft_model(nn.ModuleDict({"layer": nn.Conv3d(4, 8, 3)}), HyPSConfig(target_modules=["layer"], d=5))
    down = pm.base_model.model["layer"].hyps_down["default"].weight
    assert isinstance(pm.base_model.model["layer"].hyps_down["default"], nn.Conv3d)
    assert torch.equal(down[1], -down[0]) and torch.equal(down[3], -down[2]) and down[4].abs().sum() > 0
    assert not pm.base_model.model["layer"].hyps_up["default"].weight.any()


def test_rank_error_names_the_kernel_matricisation():
    model = nn.ModuleDict({"skip": nn.Conv3d(1, 12, 1), "up": nn.ConvTranspose3d(2, 8, 2, stride=2)})
    match = r"r=2 exceeds min\(out, in\)=1 of the Conv3d \(kernel matricised as out x in\*1x1x1\) 'skip' \(12 x 1\)"
    with pytest.raises(RankError, match=match):
        get_peft_model(model, HyPSConfig(target_modules=["skip", "up"], r=2))
    match = r"r=3 exceeds min\(out, in\)=2 of the ConvTranspose3d \(kernel matricised as in x out\*2x2x2\)"
    with pytest.raises(RankError, match=match):
        get_peft_model(model, HyPSConfig(target_modules=["up"], r=3))
    assert not hyps_layers(model), "a refused config must leave the model untouched"
    get_peft_model(model, HyPSConfig(target_modules=["skip", "up"], r=2, parallel=False))  # r binds parallel only


def test_grouped_convolution_is_refused_by_name():
    model = nn.ModuleDict({"dw": nn.Conv3d(4, 4, 3, groups=4), "pw": nn.Conv3d(4, 4, 1)})
    with pytest.raises(TargetModulesError, match=r"'dw' \(Conv3d, groups=4\).*exclude_modules"):
        get_peft_model(model, HyPSConfig(target_modules=["dw", "pw"]))
    assert not hyps_layers(model)
    with pytest.raises(TypeError, match="groups=1 only"):
        Conv(nn.Conv2d(4, 4, 3, groups=2), "default", HyPSConfig(target_modules=["x"]))


# ------------------------------------------------------------------------------- lifecycle on a small conv net


class TinyConvNet(nn.Module):
    """Conv3d -> ConvTranspose3d (k2 s2) -> 1x1x1 head: the layer kinds of a MONAI decoder, at toy size."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.enc = nn.Conv3d(2, 6, 3, padding=1)
        self.up = nn.ConvTranspose3d(6, 5, 2, stride=2)
        self.mid = nn.Conv3d(5, 5, 3, padding=1, bias=False)
        self.head = nn.Conv3d(5, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.mid(torch.relu(self.up(torch.relu(self.enc(x)))))))


NET_TARGETS = ["enc", "up", "mid"]


def _x(seed=1, n=3):
    return torch.randn(n, 2, 3, 4, 3, generator=torch.Generator().manual_seed(seed))


def test_conv_net_training_reaches_every_factor_and_leaves_base_weights():
    pm = get_peft_model(TinyConvNet(), HyPSConfig(target_modules=NET_TARGETS, modules_to_save=["head"]))
    frozen = {n: p.detach().clone() for n, p in pm.named_parameters() if not p.requires_grad}
    x = _x()
    with torch.no_grad():
        assert torch.equal(pm(x), TinyConvNet()(x))
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):
        opt.zero_grad()
        loss(pm(x)).backward()
        check_gradients(pm, first_step=step == 0, where=f" (step {step})")
        opt.step()
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    for layer in NET_TARGETS:
        for factor in ("hyps_A.", "hyps_B.", "hyps_down.", "hyps_up."):
            assert any(f".{layer}.{factor}" in n for n in trainable), (layer, factor)
    for n, p in pm.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_conv_net_save_load_multi_adapter_disable_mixed_batch(tmp_path):
    x = _x()
    with torch.no_grad():
        base_out = TinyConvNet()(x)
    torch.manual_seed(1)
    pm = get_peft_model(TinyConvNet(), HyPSConfig(target_modules=NET_TARGETS, init_weights=False))
    torch.manual_seed(2)
    other = get_peft_model(TinyConvNet(), HyPSConfig(target_modules=["up", "mid"], r=1, d=4, init_weights=False))
    with torch.no_grad():
        first, second = pm(x).clone(), other(x).clone()
    pm.save_pretrained(tmp_path / "first")
    other.save_pretrained(tmp_path / "second")
    saved = load_file(tmp_path / "first" / "adapter_model.safetensors")
    assert any(k.endswith("up.hyps_A0") for k in saved) and any(k.endswith("mid.hyps_down.weight") for k in saved)
    assert not any("base_layer" in k for k in saved)
    for kwargs in ({}, {"low_cpu_mem_usage": True}):
        loaded = PeftModel.from_pretrained(TinyConvNet(), tmp_path / "first", **kwargs)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), first, atol=1e-6, rtol=1e-6)

    pm.load_adapter(tmp_path / "second", adapter_name="second")
    pm.eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(x), first, atol=1e-6, rtol=1e-6)
        mixed = pm(x, adapter_names=["second", "__base__", "default"])
        torch.testing.assert_close(mixed, torch.stack([second[0], base_out[1], first[2]]), atol=1e-6, rtol=1e-6)
        pm.set_adapter("second")
        torch.testing.assert_close(pm(x), second, atol=1e-6, rtol=1e-6)
        with pm.disable_adapter():
            assert torch.equal(pm(x), base_out)
    pm.delete_adapter("second")
    assert not any(".second" in k for k in pm.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(pm(x), first, atol=1e-6, rtol=1e-6)


def test_conv_net_merge_rules():
    x = _x()
    pm = get_peft_model(TinyConvNet(), HyPSConfig(target_modules=NET_TARGETS, serial=False, init_weights=False))
    pm.add_adapter("serial", HyPSConfig(target_modules=NET_TARGETS, init_weights=False))
    weights = {n: p.detach().clone() for n, p in pm.named_parameters()}
    with pytest.raises(MergeError, match=r"'serial' has a serial branch.*non-linear.*serial=False"):
        pm.base_model.merge_adapter(adapter_names=["default", "serial"])
    with pytest.raises(MergeError, match="serial"):
        pm.base_model.model.up.merge(adapter_names=["serial"])
    assert all(torch.equal(p, weights[n]) for n, p in pm.named_parameters())

    with torch.no_grad():
        expected = pm(x).clone()  # "default" is active
        pm.base_model.merge_adapter(adapter_names=["default"])
        assert pm.base_model.model.up.merged_adapters == ["default"]
        torch.testing.assert_close(pm(x), expected, atol=1e-5, rtol=1e-5)
        # a third adapter added while "default" is merged decomposes the *unmerged* kernel (PEFT then unmerges)
        layer = pm.base_model.model.up
        w = TinyConvNet().up.weight.detach()
        assert not torch.allclose(layer.get_base_layer().weight, w, atol=1e-4)
        pm.add_adapter("third", HyPSConfig(target_modules=NET_TARGETS, serial=False))
        u, s, vh = torch.linalg.svd(w.reshape(w.shape[0], -1).double(), full_matrices=False)
        torch.testing.assert_close((layer.hyps_A0["third"] @ layer.hyps_B0["third"]).double(),
                                   (u[:, :2] * s[:2]) @ vh[:2], atol=1e-5, rtol=1e-5)
        assert not layer.merged
        torch.testing.assert_close(layer.get_base_layer().weight, w, atol=1e-6, rtol=0)
        with pm.disable_adapter():
            torch.testing.assert_close(pm(x), TinyConvNet()(x), atol=1e-6, rtol=1e-6)


def test_conv_net_weighted_adapter_is_the_exact_weighted_sum():
    torch.manual_seed(0)
    pm = get_peft_model(TinyConvNet(), HyPSConfig(target_modules=NET_TARGETS, serial=False, init_weights=False),
                        adapter_name="a")
    pm.add_adapter("b", HyPSConfig(target_modules=NET_TARGETS, serial=False, init_weights=False, r=1))
    pm.add_weighted_adapter(["a", "b"], [0.3, -0.7], "mix")
    for name in NET_TARGETS:
        layer = getattr(pm.base_model.model, name)
        assert layer.hyps_A["mix"].shape[1] == 3  # concatenation: rank 2 + 1
        torch.testing.assert_close(layer.get_delta_weight("mix"),
                                   0.3 * layer.get_delta_weight("a") - 0.7 * layer.get_delta_weight("b"),
                                   atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_conv_net_low_precision_and_merge(dtype):
    x = _x().to(dtype)
    base = TinyConvNet().to(dtype)
    with torch.no_grad():
        expected = base(x)
    pm = get_peft_model(base, HyPSConfig(target_modules=NET_TARGETS))
    factors = [p for n, p in pm.named_parameters() if "hyps_" in n]
    assert factors and all(p.dtype == torch.float32 for p in factors), "adapter parameters stay float32"
    with torch.no_grad():
        got = pm(x)
    assert got.dtype == dtype and torch.equal(got, expected)
    opt = torch.optim.SGD(factors, lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        loss(pm(x)).backward()
        opt.step()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0 for p in factors)

    par = get_peft_model(TinyConvNet().to(dtype), HyPSConfig(target_modules=NET_TARGETS, serial=False,
                                                             init_weights=False))
    with torch.no_grad():
        unmerged = par(x).clone()
        plain = par.merge_and_unload()
        assert plain.up.weight.dtype == dtype
        torch.testing.assert_close(plain(x), unmerged, atol=3e-2, rtol=3e-2)


def test_conv_net_torch_autocast():
    pm = get_peft_model(TinyConvNet(), HyPSConfig(target_modules=NET_TARGETS, init_weights=False))
    x = _x()
    with torch.no_grad():
        ref = pm(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = pm(x)
        loss(y).backward()
    torch.testing.assert_close(y.float(), ref, atol=5e-2, rtol=5e-2)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in pm.named_parameters() if "hyps_" in n)


def test_conv_net_gradient_checkpointing_gives_the_same_gradients():
    """Non-reentrant checkpointing re-runs the forward in backward: the conv path keeps no cache, so it must agree."""
    from torch.utils.checkpoint import checkpoint

    pm = get_peft_model(TinyConvNet(), HyPSConfig(target_modules=NET_TARGETS, init_weights=False))
    x = _x()
    grads = []
    for ckpt in (False, True):
        pm.zero_grad()
        y = checkpoint(pm, x, use_reentrant=False) if ckpt else pm(x)
        loss(y).backward()
        grads.append({n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)


def test_conv_dropout_keeps_identity_at_init():
    x = _x()
    pm = get_peft_model(TinyConvNet(), HyPSConfig(target_modules=NET_TARGETS, dropout=0.5))
    pm.train()
    with torch.no_grad():
        assert torch.equal(pm(x), TinyConvNet()(x))


# -------------------------------------------------------------------------------------- CNN-only MONAI network


def _basic_unet():
    from monai.networks.nets import BasicUNet

    torch.manual_seed(0)
    return BasicUNet(spatial_dims=3, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 16, 4)).eval()


# every Conv3d of the network's TwoConv blocks ("...conv_0.conv") and every ConvTranspose3d ("upsample.deconv");
# the 1x1x1 head final_conv trains in full
UNET_TARGETS = ["conv", "deconv"]


def test_basic_unet_identity_gradients_merge_save_load(tmp_path):
    base = _basic_unet()
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y0 = base(x)
    r, d = 2, 2
    torch.manual_seed(0)
    pm = get_peft_model(copy.deepcopy(base), HyPSConfig(target_modules=UNET_TARGETS, r=r, d=d,
                                                        modules_to_save=["final_conv"]))
    layers = named_hyps_layers(pm)
    bases = [m.get_base_layer() for m in layers.values()]
    n_conv = sum(isinstance(m, nn.Conv3d) for m in base.modules()) - 1  # all but final_conv
    assert len(layers) == n_conv + 4 and sum(isinstance(b, nn.ConvTranspose3d) for b in bases) == 4
    # independent count: r (rows + cols) of the kernel matrix + 2 d out per layer, plus the head (4 -> 2, bias)
    expected = sum(r * (b.weight.shape[0] + b.weight[0].numel()) + 2 * d * b.out_channels for b in bases)
    assert pm.get_nb_trainable_parameters()[0] == expected + 2 * 4 + 2

    trained = train_two_steps(pm, x, y0, lr=1e-2)
    assert not torch.allclose(trained, y0, atol=1e-5)
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_basic_unet(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trained, atol=1e-5, rtol=1e-5)
        with loaded.disable_adapter():
            torch.testing.assert_close(loaded(x), y0, atol=0, rtol=0)

    torch.manual_seed(0)
    par = get_peft_model(copy.deepcopy(base), HyPSConfig(target_modules=UNET_TARGETS, serial=False,
                                                         init_weights=False))
    with torch.no_grad():
        unmerged = par(x).clone()
        plain = par.merge_and_unload(safe_merge=True)
        assert type(plain) is type(base) and not hyps_layers(plain)
        torch.testing.assert_close(plain(x), unmerged, atol=1e-4, rtol=1e-4)
