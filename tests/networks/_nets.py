"""Test-sized MONAI networks as specs (``_target_`` + kwargs) that keep the real module names."""

from __future__ import annotations

import torch

UNETR = "monai.networks.nets.UNETR"
SWIN = "monai.networks.nets.SwinUNETR"


def unetr_kwargs(out_channels: int = 2, img: int = 16) -> dict:
    return dict(in_channels=1, out_channels=out_channels, img_size=[img] * 3, feature_size=8, hidden_size=96,
                mlp_dim=192, num_heads=4, dropout_rate=0.0)


def swin_kwargs(out_channels: int = 2, **extra) -> dict:
    return dict(in_channels=1, out_channels=out_channels, feature_size=12, depths=[1, 1, 1, 1], **extra)


def build(class_path: str, kwargs: dict, seed: int = 0) -> torch.nn.Module:
    from peft_tensor.networks import build_from_spec

    torch.manual_seed(seed)
    return build_from_spec(class_path, kwargs)


def same_tensors(a: dict, b: dict, keys=None) -> bool:
    keys = list(a) if keys is None else list(keys)
    return all(torch.equal(a[k], b[k]) for k in keys)


VIT_KW = dict(in_channels=1, img_size=[16, 16, 16], patch_size=[8, 8, 8], hidden_size=96, mlp_dim=192, num_layers=2,
              num_heads=4)
# The ten networks with a preset, test-sized, real module names: (class path, kwargs).
NETS = {
    "unetr": (UNETR, unetr_kwargs()),
    "swinunetr": (SWIN, swin_kwargs()),
    "swinunetr_v2": (SWIN, swin_kwargs(use_v2=True)),
    "vit": ("monai.networks.nets.ViT", {**VIT_KW, "classification": True, "num_classes": 3}),
    "vitautoenc": ("monai.networks.nets.ViTAutoEnc", {**VIT_KW, "patch_size": [4, 4, 4]}),
    "segresnet": ("monai.networks.nets.SegResNet", dict(spatial_dims=3, in_channels=1, out_channels=2, init_filters=8,
                                                       blocks_down=(1, 1), blocks_up=(1,))),
    "unet": ("monai.networks.nets.UNet", dict(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16),
                                             strides=(2, 2), num_res_units=1)),
    "dynunet": ("monai.networks.nets.DynUNet", dict(spatial_dims=3, in_channels=1, out_channels=2,
                                                   kernel_size=[3, 3, 3], strides=[1, 2, 2],
                                                   upsample_kernel_size=[2, 2], filters=[4, 8, 16], res_block=True)),
    "basicunet": ("monai.networks.nets.BasicUNet", dict(spatial_dims=3, in_channels=1, out_channels=2,
                                                       features=(4, 4, 8, 8, 16, 4))),
    "attentionunet": ("monai.networks.nets.AttentionUnet", dict(spatial_dims=3, in_channels=1, out_channels=2,
                                                               channels=(4, 8, 16), strides=(2, 2))),
}
CNNS = ("segresnet", "unet", "dynunet", "basicunet", "attentionunet")


def expected_targets(case: str, net: torch.nn.Module) -> set[str]:
    """The layers a network's preset should adapt, from the module types (independent of the preset's suffixes):
    the transformer blocks' Linear layers (SwinUNETR v2: also its encoder's residual convolutions); for a CNN every
    groups=1 convolution with a kernel larger than 1."""
    import math

    from torch import nn

    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    mods = dict(net.named_modules())
    if case in CNNS:
        return {n for n, m in mods.items()
                if isinstance(m, convs) and m.groups == 1 and math.prod(m.kernel_size) > 1}
    inside = {"unetr": "vit.blocks.", "vit": "blocks.", "vitautoenc": "blocks."}.get(case, "swinViT.layers")
    found = {n for n, m in mods.items() if isinstance(m, nn.Linear) and n.startswith(inside)}
    if case == "swinunetr_v2":
        found |= {n for n, m in mods.items() if isinstance(m, convs) and n.startswith("swinViT.layers")}
    return found
