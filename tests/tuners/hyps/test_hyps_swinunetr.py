"""HyPS on MONAI SwinUNETR, the paper's network: a test-sized model at 64^3 for the lifecycle, the full-size
SwinUNETR-48 for the exact parameter counts. Each model is built once per module (SwinUNETR is the slow part)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

import peft_tensor.tuners.hyps  # noqa: F401  (registers HYPS with PEFT)
from peft_tensor.errors import MergeError
from peft_tensor.tuners.hyps import SWINUNETR_HYPS_TARGETS, HyPSConfig
from tests._models import SWIN_TARGETS, full_swinunetr, tiny_swinunetr
from tests.tuners.hyps._hyps import check_gradients, hyps_layers, loss, named_hyps_layers, train_two_steps

# The decoder and head that train in full in the paper (dotted "out.conv.conv": PEFT matches modules_to_save by bare
# suffix, so a plain "out" would also catch any module whose name ends in "out").
SWIN_DECODER = ["decoder1", "decoder2", "decoder3", "decoder4", "decoder5", "out.conv.conv"]

# The whole network through adapters: the paper's Swin Linears plus every convolution of decoder1-5 (the k2 s2
# ConvTranspose3d upsampling, the two 3x3x3 Conv3d and the 1x1x1 residual Conv3d of each block); only the 1x1x1 head
# trains in full.
SWIN_DECODER_CONVS = ["transp_conv.conv", "conv_block.conv1.conv", "conv_block.conv2.conv", "conv_block.conv3.conv"]


@pytest.fixture(scope="module")
def swin():
    """(base model, 64^3 input, base output). SwinUNETR needs sides that are multiples of 32 and >= 64."""
    base = tiny_swinunetr()
    x = torch.randn(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y0 = base(x)
    return base, x, y0


@pytest.fixture(scope="module")
def full():
    return full_swinunetr()


def test_paper_target_constant_matches_the_test_models():
    assert SWINUNETR_HYPS_TARGETS == SWIN_TARGETS


def test_swinunetr_paper_setup_identity_training_disable_save_load(swin, tmp_path):
    base, x, y0 = swin
    # A randomly initialised Swin produces strongly correlated tokens (across-token std about half the mean), so a
    # d=2 ReLU bottleneck can come out dead for every token of a layer (each Down row negative on all of them; about
    # 1 in 4 per such layer). That is a property of the random test network, not of the method; seed the adapter
    # initialisation so that every serial branch of this network is alive, then require a gradient on every factor.
    torch.manual_seed(0)
    pm = get_peft_model(copy.deepcopy(base), HyPSConfig(target_modules=SWINUNETR_HYPS_TARGETS,
                                                        modules_to_save=SWIN_DECODER))
    layers = named_hyps_layers(pm)
    # depths (1,1,1,1): per stage qkv, proj, linear1, linear2 + the patch-merging reduction; every one an nn.Linear
    assert len(layers) == 4 * 5
    assert all(isinstance(m.get_base_layer(), nn.Linear) for m in layers.values())
    assert not any("patch_embed" in n for n in layers)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert any(".decoder5.modules_to_save.default." in n for n in trainable)
    assert any(".out.conv.conv.modules_to_save.default." in n for n in trainable)
    frozen_parts = ("base_model.model.encoder", "base_model.model.swinViT.patch_embed")
    assert not any(n.startswith(frozen_parts) for n in trainable)
    assert all("hyps_" in n or "modules_to_save" in n for n in trainable)

    pm.train()
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-3)
    y = pm(x)
    torch.testing.assert_close(y.detach(), y0, atol=1e-6, rtol=1e-6)  # identity at init
    loss(y, seed=3).backward()
    check_gradients(pm, first_step=True)
    opt.step()
    opt.zero_grad()
    y = pm(x)
    loss(y, seed=3).backward()
    check_gradients(pm, where=" after one step")
    assert not torch.allclose(y.detach(), y0, atol=1e-6), "an optimiser step did not change the output"
    trained = y.detach()  # no dropout in this network: the training-mode output is the inference output

    pm.eval()
    with torch.no_grad():
        with pm.disable_adapter():
            torch.testing.assert_close(pm(x), y0, atol=0, rtol=0)  # base encoder and the original decoder

    pm.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert any("decoder5" in k for k in saved) and any(k.endswith("hyps_A0") for k in saved)
    assert not any("swinViT" in k and "hyps_" not in k for k in saved), "encoder base weights must not be saved"
    loaded = PeftModel.from_pretrained(tiny_swinunetr(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trained, atol=1e-6, rtol=1e-6)
    resumed = PeftModel.from_pretrained(tiny_swinunetr(), tmp_path, is_trainable=True)
    assert resumed.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    for (n1, p1), (n2, p2) in zip(pm.named_parameters(), resumed.named_parameters()):
        assert n1 == n2 and p1.requires_grad == p2.requires_grad and torch.equal(p1, p2), n1


def test_swinunetr_parallel_only_merge_and_unload_is_a_plain_swinunetr(swin):
    base, x, _ = swin
    torch.manual_seed(0)
    pm = get_peft_model(copy.deepcopy(base), HyPSConfig(target_modules=SWINUNETR_HYPS_TARGETS, serial=False,
                                                        init_weights=False, modules_to_save=SWIN_DECODER))
    head = pm.base_model.model.out.conv.conv.modules_to_save["default"]
    with torch.no_grad():
        head.weight.add_(1.0)  # a "trained" head copy, which the merged network must keep
        expected = pm.base_model.model.swinViT(x)  # every adapted layer lives in the Swin encoder
    plain = pm.merge_and_unload(safe_merge=True)
    assert type(plain) is type(base) and not hyps_layers(plain)
    assert type(plain.out.conv.conv) is nn.Conv3d and torch.equal(plain.out.conv.conv.weight, head.weight)
    assert type(plain.decoder5) is type(base.decoder5)  # block-level modules_to_save unwrap too
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in base.named_parameters()]
    with torch.no_grad():
        for got, want in zip(plain.swinViT(x), expected):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_swinunetr_merge_with_serial_branch_explains_what_to_do(swin):
    base, _, _ = swin
    pm = get_peft_model(copy.deepcopy(base), HyPSConfig(target_modules=SWINUNETR_HYPS_TARGETS))
    with pytest.raises(MergeError, match=r"cannot be folded into the layer's weight.*unmerged.*serial=False"):
        pm.merge_and_unload()
    with pytest.raises(MergeError, match="serial branch"):
        pm.merge_adapter()
    assert not any(m.merged for m in hyps_layers(pm))


def test_swinunetr_bare_proj_also_adapts_the_patch_embedding_conv(swin):
    """HyPS adapts convolutions too, so a bare "proj" is no error: it wraps the patch-embedding Conv3d as well as every
    attn.proj (which is why SWINUNETR_HYPS_TARGETS spells out "attn.proj")."""
    base, _, _ = swin
    pm = get_peft_model(copy.deepcopy(base), HyPSConfig(target_modules=["qkv", "proj"]))
    layers = named_hyps_layers(pm)
    assert isinstance(layers["base_model.model.swinViT.patch_embed.proj"].get_base_layer(), nn.Conv3d)
    assert len(layers) == 1 + 2 * 4 and sum(n.endswith(("attn.qkv", "attn.proj")) for n in layers) == 2 * 4


# ------------------------------------------------------------------------------------------- full-size counts


def _count(pm, adapter):
    return sum(p.numel() for n, p in pm.named_parameters() if "hyps_" in n and f".{adapter}" in n)


def test_full_swinunetr_exact_counts(full):
    assert sum(p.numel() for p in full.parameters()) == 62_186_708
    decoder = sum(p.numel() for name in ["decoder1", "decoder2", "decoder3", "decoder4", "decoder5", "out"]
                  for p in getattr(full, name).parameters())
    assert decoder == 19_597_922

    pm = get_peft_model(copy.deepcopy(full), HyPSConfig(target_modules=SWINUNETR_HYPS_TARGETS,
                                                        modules_to_save=SWIN_DECODER))
    assert len(hyps_layers(pm)) == 36
    r, d = 2, 2
    assert _count(pm, "default") == 28_800 * d + 30_240 * r == 118_080
    trainable, total = pm.get_nb_trainable_parameters()
    assert trainable == 118_080 + 19_597_922 == 19_716_002
    assert total == 62_186_708 + 118_080 + 19_597_922  # base + adapter + the trained copy of the decoder

    # each branch on its own scales exactly with its width: serial 28,800 * d, parallel 30,240 * r
    for name, cfg in {
        "serial_d1": HyPSConfig(target_modules=SWINUNETR_HYPS_TARGETS, parallel=False, d=1),
        "serial_d3": HyPSConfig(target_modules=SWINUNETR_HYPS_TARGETS, parallel=False, d=3),
        "parallel_r1": HyPSConfig(target_modules=SWINUNETR_HYPS_TARGETS, serial=False, r=1),
        "parallel_r4": HyPSConfig(target_modules=SWINUNETR_HYPS_TARGETS, serial=False, r=4),
    }.items():
        pm.add_adapter(name, cfg)
        width = int(name[-1])
        expected = 28_800 * width if name.startswith("serial") else 30_240 * width
        assert _count(pm, name) == expected, name
    # the frozen initial factors are buffers, not parameters: 30,240 * r more values in the saved file
    initial = sum(m.hyps_A0["default"].numel() + m.hyps_B0["default"].numel() for m in hyps_layers(pm))
    assert initial == 30_240 * 2


def test_full_swinunetr_whole_network_counts_with_decoder_convolutions(full):
    """The decoder convolutions through adapters instead of trained in full. Closed form for feature size f = 48:
    decoder i = 2..5 works at c = f 2^(i-2) channels: ConvTranspose3d 2c -> c (k2, matrix 2c x 8c), Conv3d 2c -> c and
    c -> c (k3: c x 54c, c x 27c), 1x1x1 residual 2c -> c (c x 2c): 96c per r; decoder1 has a f -> f transposed
    conv (f x 8f): 95f. Parallel 96 (1 + 2 + 4 + 8) f + 95 f = 1,535 f per r; serial 2 out per layer: 128 f per d."""
    pm = get_peft_model(copy.deepcopy(full), HyPSConfig(target_modules=SWINUNETR_HYPS_TARGETS + SWIN_DECODER_CONVS,
                                                        modules_to_save=["out.conv.conv"]))
    f, r, d = 48, 2, 2
    assert len(hyps_layers(pm)) == 36 + 20
    adapter = 28_800 * d + 30_240 * r + 1_535 * f * r + 128 * f * d
    assert _count(pm, "default") == adapter == 277_728
    assert pm.get_nb_trainable_parameters()[0] == adapter + 48 * 2 + 2 == 277_826  # the 1x1x1 head in full
    initial = sum(m.hyps_A0["default"].numel() + m.hyps_B0["default"].numel() for m in hyps_layers(pm))
    assert initial == (30_240 + 1_535 * f) * r == 207_840  # frozen A0, B0 saved with the adapter


# ------------------------------------------------------------------------------------- decoder convolutions too

def test_swinunetr_with_decoder_convolutions_identity_gradients_merge_save_load(swin, tmp_path):
    base, x, y0 = swin
    r, d = 2, 2
    torch.manual_seed(0)
    pm = get_peft_model(copy.deepcopy(base), HyPSConfig(target_modules=SWINUNETR_HYPS_TARGETS + SWIN_DECODER_CONVS,
                                                        r=r, d=d, modules_to_save=["out.conv.conv"]))
    layers = named_hyps_layers(pm)
    convs = {n: m.get_base_layer() for n, m in layers.items() if not isinstance(m.get_base_layer(), nn.Linear)}
    assert len(layers) == 4 * 5 + 5 * 4 and len(convs) == 5 * 4
    assert all(".decoder" in n for n in convs) and sum(isinstance(c, nn.ConvTranspose3d) for c in convs.values()) == 5
    # independent count per convolution: r (out + in k^3) for a Conv3d, r (in + out k^3) for a ConvTranspose3d (its
    # weight is in x out x k^3), and the serial 1x1x1 pair 2 d out; the head: 12 -> 2 with bias
    conv_count = sum(r * (c.out_channels + c.in_channels * math.prod(c.kernel_size)) if isinstance(c, nn.Conv3d)
                     else r * (c.in_channels + c.out_channels * math.prod(c.kernel_size)) for c in convs.values())
    conv_count += sum(2 * d * c.out_channels for c in convs.values())
    linear_count = sum(r * (m.in_features + m.out_features) + 2 * d * m.out_features
                       for m in layers.values() if isinstance(m.get_base_layer(), nn.Linear))
    assert pm.get_nb_trainable_parameters()[0] == conv_count + linear_count + 12 * 2 + 2

    trained = train_two_steps(pm, x, y0, lr=1e-3, seed=3)
    pm.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert any(k.endswith("decoder5.transp_conv.conv.hyps_A0") for k in saved)
    assert not any("decoder" in k and "hyps_" not in k for k in saved), "decoder base weights must not be saved"
    loaded = PeftModel.from_pretrained(tiny_swinunetr(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trained, atol=1e-5, rtol=1e-5)

    # parallel-only: merging folds every factor into its kernel, the plain SwinUNETR gives the same output
    torch.manual_seed(0)
    par = get_peft_model(copy.deepcopy(base), HyPSConfig(target_modules=SWINUNETR_HYPS_TARGETS + SWIN_DECODER_CONVS,
                                                         serial=False, init_weights=False))
    with torch.no_grad():
        unmerged = par(x).clone()
        plain = par.merge_and_unload(safe_merge=True)
        assert type(plain) is type(base) and not hyps_layers(plain)
        assert type(plain.decoder5.transp_conv.conv) is nn.ConvTranspose3d
        torch.testing.assert_close(plain(x), unmerged, atol=1e-4, rtol=1e-4)
