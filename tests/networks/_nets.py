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
