"""Convolution targets for the tensor-group methods (issue 12): tCURLoRA and LoRA-PT on Conv1d/2d/3d and
ConvTranspose3d, on a CNN-only MONAI network (BasicUNet, test-sized) and on small hand-made layers.

Independent oracles: the kernel layout is checked entry by entry against ``weight[:, :, p]`` of the kernel, the
adapted layer against ``F.conv*(x, W + delta)`` written out here, counts against closed formulas.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from torch import nn

import peft_tensor
from peft_tensor import LoraPTConfig, TCURLoraConfig
from peft_tensor.errors import TargetModulesError

# BasicUNet(features=(4, 4, 8, 8, 16, 4)): every Conv3d and the ConvTranspose3d up-samplers, except the first
# convolution (1 input channel: rank 1 at most)
UNET_TARGETS = r".*conv_\d\.conv|.*upsample\.deconv"
UNET_EXCLUDE = ["conv_0.conv_0.conv"]
CONFIGS = {
    "tcurlora-kernel": lambda **kw: TCURLoraConfig(r=2, target_modules=UNET_TARGETS, exclude_modules=UNET_EXCLUDE,
                                                   **kw),
    "tcurlora-stacked": lambda **kw: TCURLoraConfig(r=2, target_modules=UNET_TARGETS, exclude_modules=UNET_EXCLUDE,
                                                    conv_layout="stacked", **kw),
    "lorapt-kernel": lambda **kw: LoraPTConfig(r=2, target_modules=UNET_TARGETS, exclude_modules=UNET_EXCLUDE,
                                               svd_method="full", **kw),
}


# these tiny convolutions run several times faster on one thread than on two contended ones (conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def basic_unet(seed: int = 0):
    from monai.networks.nets import BasicUNet

    torch.manual_seed(seed)
    # batch norm in eval mode: its running statistics work down to the 1-voxel bottom of a 16^3 input
    return BasicUNet(spatial_dims=3, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 16, 4), norm="batch").eval()


def _x(batch: int = 2, seed: int = 1):
    return torch.randn(batch, 1, 16, 16, 16, generator=torch.Generator().manual_seed(seed))


def _trainable(pm):
    return [p for p in pm.parameters() if p.requires_grad]


def _expected_count(model, config) -> int:
    """Trainable numbers from the layer shapes alone: tCURLoRA r^2 per slice; LoRA-PT L (r (n1 + n2) + r^2) per
    group. Kernel layout: one group of K = prod(kernel) slices per convolution; stacked: whole flattened kernels
    stacked by shape; 1x1x1 kernels (K = 1) join the groups of their shape."""
    from peft_tensor.tuners._targets import find_targets

    r, groups = config.r, {}
    for name, m in find_targets(model, config):
        a, b, *k = m.weight.shape
        K = int(torch.tensor(k).prod()) if k else 1
        if K > 1 and config.conv_layout == "kernel":
            groups[name] = (K, a, b)
        else:
            key = (a, b * K)
            L = groups.get(key, (0,))[0]
            groups[key] = (L + 1, a, b * K)
    if isinstance(config, TCURLoraConfig):
        return sum(L * r * r for L, _, _ in groups.values())
    return sum(L * (r * (n1 + n2) + r * r) for L, n1, n2 in groups.values())


@pytest.mark.parametrize("case", list(CONFIGS))
def test_basic_unet_identity_gradients_merge_save_load(case, tmp_path):
    x = _x()
    base = basic_unet()
    with torch.no_grad():
        expected = base(x)
    config = CONFIGS[case]()
    pm = get_peft_model(base, config)
    assert pm.get_nb_trainable_parameters()[0] == _expected_count(basic_unet(), CONFIGS[case]()) > 0
    kinds = {type(m.get_base_layer()).__name__ for m in pm.modules() if hasattr(m, "group_slices")}
    assert kinds == {"Conv3d", "ConvTranspose3d"}
    with torch.no_grad():
        assert torch.equal(pm(x), expected), "identity at init, bit for bit"
    # every factor gets a gradient; a step changes the function; nothing else trains
    (pm(x) ** 2).mean().backward()
    for n, p in pm.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == p.requires_grad, n
    torch.optim.Adam(_trainable(pm), lr=1e-2).step()
    with torch.no_grad():
        after = pm(x)
        assert not torch.allclose(after, expected, atol=1e-5)
        # merge into the kernels equals the unmerged adapter; unmerge restores the base kernels
        pm.merge_adapter(safe_merge=True)
        torch.testing.assert_close(pm(x), after, atol=1e-5, rtol=1e-5)
        pm.unmerge_adapter()
        adapted = {n.replace(".base_layer", ""): p for n, p in pm.get_base_model().named_parameters()}
        for n, p in basic_unet().named_parameters():
            torch.testing.assert_close(adapted[n], p, atol=1e-6, rtol=0, msg=n)
        with pm.disable_adapter():
            torch.testing.assert_close(pm(x), expected, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(pm(x), after, atol=1e-6, rtol=1e-6)
    pm.save_pretrained(tmp_path)
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    n_trainable = pm.get_nb_trainable_parameters()[0]
    assert size < 8 * n_trainable + 16 * 1024, f"{size} bytes: more than the factors and their initial copies"
    loaded = PeftModel.from_pretrained(basic_unet(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), after, atol=1e-6, rtol=1e-6)
        plain = loaded.merge_and_unload()
        assert not any("base_layer" in n for n, _ in plain.named_modules())
        torch.testing.assert_close(plain(x), after, atol=1e-5, rtol=1e-5)


class Convs(nn.Module):
    """Every convolution type with stride, padding, dilation and bias options, plus a Linear and a 1x1x1 kernel of
    the same out x in shape (they share a group)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv1d(3, 5, 3, stride=2, padding=2, dilation=2)
        self.c2 = nn.Conv2d(3, 5, (3, 2), padding=(1, 0), bias=False)
        self.c3 = nn.Conv3d(3, 6, 3, padding=1, stride=(1, 2, 1))
        self.point = nn.Conv3d(6, 6, 1)
        self.up = nn.ConvTranspose3d(6, 4, 2, stride=2, output_padding=1, dilation=1)
        self.lin = nn.Linear(6, 6)

    def forward(self, x3):
        return self.lin(self.up(self.point(self.c3(x3))).mean((2, 3, 4)).repeat(1, 2)[:, :6])


def _inputs(seed=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 3, 11, generator=g), torch.randn(2, 3, 6, 5, generator=g),
            torch.randn(2, 3, 4, 6, 4, generator=g))


@pytest.mark.parametrize("make", [TCURLoraConfig, LoraPTConfig])
def test_kernel_layout_is_the_kernel_positions_and_the_layer_is_conv_of_w_plus_delta(make):
    model = Convs()
    pm = get_peft_model(model, make(r=2, target_modules=["c1", "c2", "c3", "point", "up", "lin"], init_weights=False))
    shapes = {g.name: [g.n_slices, g.n1, g.n2] for g in pm.base_model.groups("default")}
    assert shapes == {"kernel_c1": [3, 5, 3], "kernel_c2": [6, 5, 3], "kernel_c3": [27, 6, 3],
                      "shape_6x6": [2, 6, 6], "kernel_up": [8, 6, 4]}, "1x1x1 kernel and Linear share a group"
    groups = {g.name: g for g in pm.base_model.groups("default")}
    x1, x2, x3 = _inputs()
    for name, fn, x, kw in (("c1", F.conv1d, x1, dict(stride=2, padding=2, dilation=2)),
                            ("c2", F.conv2d, x2, dict(padding=(1, 0))),
                            ("c3", F.conv3d, x3, dict(padding=1, stride=(1, 2, 1)))):
        layer = getattr(pm.base_model.model, name)
        base = layer.get_base_layer()
        d = groups[f"kernel_{name}"].dense_delta()  # (K, out, in)
        delta = layer.get_delta_weight("default")
        assert delta.shape == base.weight.shape
        for p in range(d.shape[0]):  # slice p is kernel position p (row-major), out x in
            assert torch.equal(delta.reshape(*delta.shape[:2], -1)[:, :, p], d[p])
        with torch.no_grad():
            torch.testing.assert_close(layer(x), fn(x, base.weight + delta, base.bias, **kw), atol=1e-6, rtol=1e-6)
    up = pm.base_model.model.up
    d = groups["kernel_up"].dense_delta()
    delta = up.get_delta_weight("default")
    assert torch.equal(delta.reshape(6, 4, -1)[:, :, 5], d[5]), "a transposed kernel's slice is in x out, as stored"
    y = torch.randn(2, 6, 3, 3, 3)
    with torch.no_grad():
        ref = F.conv_transpose3d(y, up.get_base_layer().weight + delta, up.get_base_layer().bias, stride=2,
                                 output_padding=1)
        torch.testing.assert_close(up(y), ref, atol=1e-6, rtol=1e-6)
        # output_size as a positional argument, as nn.ConvTranspose3d takes it
        ref = F.conv_transpose3d(y, up.get_base_layer().weight + delta, up.get_base_layer().bias, stride=2)
        torch.testing.assert_close(up(y, (6, 6, 6)), ref, atol=1e-6, rtol=1e-6)


def test_grouped_convolutions_and_other_layer_types_are_refused_clearly():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.BatchNorm2d(4))
    match = r"'0' \(Conv2d, groups=2\).*groups=1 convolutions only.*add them to exclude_modules"
    with pytest.raises(TargetModulesError, match=match):
        get_peft_model(model, TCURLoraConfig(r=1, target_modules=["0"]))
    match = r"matched '1' \(BatchNorm2d\), which LoRA-PT cannot adapt .* e.g. target_modules=\['0'\]"
    with pytest.raises(TargetModulesError, match=match):
        get_peft_model(nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)),
                       LoraPTConfig(r=1, target_modules=["0", "1"]))
    # nothing matched in a CNN: the preset and convolutions that fit r=1 are named
    with pytest.raises(TargetModulesError, match=r"matched no module of BasicUNet: pass target_modules=None for "
                       r"BasicUNet's preset, or name its layers .* e.g. target_modules=\['conv_0.conv'"):
        get_peft_model(basic_unet(), TCURLoraConfig(r=1, target_modules=["attn.qkv"]))


@pytest.mark.parametrize("make", [TCURLoraConfig, LoraPTConfig])
def test_multi_adapter_mixed_batch_and_bfloat16(make, tmp_path):
    x = _x(batch=3)
    base_out = basic_unet()(x).detach()
    cfg = dict(r=2, target_modules=UNET_TARGETS, exclude_modules=UNET_EXCLUDE, init_weights=False)
    pm = get_peft_model(basic_unet(), make(**cfg))
    other_base = basic_unet()  # reseeds: the seed that makes the second adapter differ comes after it
    torch.manual_seed(7)
    other = get_peft_model(other_base, make(**cfg))
    other.save_pretrained(tmp_path)
    pm.load_adapter(tmp_path, adapter_name="second")
    with torch.no_grad():
        first = pm(x)
        pm.set_adapter("second")
        second = pm(x)
        torch.testing.assert_close(second, other(x), atol=1e-6, rtol=1e-6)
        assert not torch.allclose(first, second, atol=1e-4)
        mixed = pm(x, adapter_names=["default", "__base__", "second"])
    torch.testing.assert_close(mixed[0], first[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(mixed[1], base_out[1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(mixed[2], second[2], atol=1e-6, rtol=1e-6)
    # a bfloat16 base: identity at init bit for bit, adapter state in float32, gradients reach it
    low = basic_unet().to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    with torch.no_grad():
        ref = low(xb)
    pm = get_peft_model(low, make(r=2, target_modules=UNET_TARGETS, exclude_modules=UNET_EXCLUDE))
    with torch.no_grad():
        assert torch.equal(pm(xb), ref)
    pm(xb).float().square().mean().backward()
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.abs().sum() > 0 for p in _trainable(pm))


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_loading_runs_no_decomposition_and_checkpointing_gives_the_same_gradients(low_cpu_mem_usage, tmp_path,
                                                                                   monkeypatch):
    from torch.utils.checkpoint import checkpoint

    x = _x()
    pm = get_peft_model(basic_unet(), CONFIGS["tcurlora-kernel"](init_weights=False))
    with torch.no_grad():
        expected = pm(x)
    pm.save_pretrained(tmp_path)

    def refuse(*a, **k):
        raise AssertionError("loading must not decompose")

    import peft_tensor.tuners.tcurlora.layer as tl

    with monkeypatch.context() as m:
        m.setattr(tl, "tensor_cur", refuse)
        loaded = peft_tensor.from_pretrained(basic_unet(), str(tmp_path), low_cpu_mem_usage=low_cpu_mem_usage)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), expected, atol=1e-6, rtol=1e-6)
    if low_cpu_mem_usage:
        return
    # re-entrant checkpointing of a decoder block: the same gradients as without
    grads = []
    for ckpt in (False, True):
        model = PeftModel.from_pretrained(basic_unet(), tmp_path, is_trainable=True)
        block = model.base_model.model.upcat_1
        if ckpt:
            forward = block.forward
            block.forward = lambda *a, f=forward: checkpoint(f, *a, use_reentrant=True)
        (model(x) ** 2).mean().backward()
        grads.append([p.grad.clone() for p in _trainable(model)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
