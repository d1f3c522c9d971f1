"""Backbones from config dicts, and the files that record which backbone a checkpoint belongs to."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..registry import SWINUNETR_TARGETS, UNETR_TARGETS
# What the papers train beside the adapter in every PEFT arm (the "decoder"): UNETR decoder2-5 + head, 2,678,562
# parameters in UNETR-B (tCURLoRA r=8 then trains the paper's 2,683,170); SwinUNETR decoder1-5 + head, 19,597,922 in
# SwinUNETR-48 (HyPS). The convolutional skip encoders (encoder1-4, and encoder10 in SwinUNETR) stay frozen there.
UNETR_DECODER = ["decoder2", "decoder3", "decoder4", "decoder5", "out.conv.conv"]
SWIN_DECODER = ["decoder1", "decoder2", "decoder3", "decoder4", "decoder5", "out.conv.conv"]
HEAD = ["out.conv.conv"]
# The wider set the recipes trained before (the skip encoders too), kept as the arm option ``decoder: wide``.
UNETR_DECODER_WIDE = ["encoder1", "encoder2", "encoder3", "encoder4", *UNETR_DECODER]
SWIN_DECODER_WIDE = ["encoder1", "encoder2", "encoder3", "encoder4", "encoder10", *SWIN_DECODER]
DECODER_SETS = ("paper", "wide", "head")

_UNETR_DEFAULTS = dict(in_channels=1, out_channels=2, img_size=128, feature_size=16, hidden_size=768, mlp_dim=3072,
                       num_heads=12, proj_type="conv", norm_name="instance", dropout_rate=0.1, qkv_bias=False)
_SWIN_DEFAULTS = dict(in_channels=1, out_channels=2, feature_size=48, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24))


def model_kwargs(cfg: dict) -> tuple[str, dict]:
    """(name, constructor kwargs) with defaults filled in (UNETR-B / SwinUNETR-48 as in the papers)."""
    cfg = {k: v for k, v in dict(cfg).items() if k != "pretrained" and v is not None}
    name = str(cfg.pop("name", "unetr")).lower()
    if name == "unetr":
        kw = {**_UNETR_DEFAULTS, **cfg}
        if isinstance(kw["img_size"], int):
            kw["img_size"] = [kw["img_size"]] * 3
        if any(int(s) % 16 for s in kw["img_size"]):
            raise ValueError(f"UNETR needs img_size divisible by 16, got {kw['img_size']}")
        kw["img_size"] = list(kw["img_size"])
    elif name == "swinunetr":
        kw = {**_SWIN_DEFAULTS, **cfg}
        kw.pop("img_size", None)
        kw["depths"], kw["num_heads"] = list(kw["depths"]), list(kw["num_heads"])
    else:
        raise ValueError(f"unknown backbone {name!r}: use 'unetr' or 'swinunetr'")
    return name, kw


def build_model(cfg: dict) -> torch.nn.Module:
    """A MONAI UNETR or SwinUNETR from ``cfg`` (``name`` plus constructor arguments)."""
    name, kw = model_kwargs(cfg)
    if name == "unetr":
        from monai.networks.nets import UNETR

        return UNETR(**{**kw, "img_size": tuple(kw["img_size"])})
    from monai.networks.nets import SwinUNETR

    return SwinUNETR(**{**kw, "depths": tuple(kw["depths"]), "num_heads": tuple(kw["num_heads"])})


def defaults_for(cfg: dict, decoder: str = "paper") -> dict:
    """Targets and the modules trained beside the adapter for the backbone named in ``cfg``. ``decoder``: ``"paper"``
    (the papers' decoder + head, the default), ``"wide"`` (also the convolutional skip encoders) or ``"head"`` (the
    1x1x1 output head only: the adapter alone)."""
    name = str(dict(cfg).get("name", "unetr")).lower()
    if decoder not in DECODER_SETS:
        raise ValueError(f"unknown decoder set {decoder!r}: use one of {', '.join(DECODER_SETS)}")
    swin = name == "swinunetr"
    sets = {"paper": SWIN_DECODER if swin else UNETR_DECODER,
            "wide": SWIN_DECODER_WIDE if swin else UNETR_DECODER_WIDE, "head": HEAD}
    return {"target_modules": list(SWINUNETR_TARGETS if swin else UNETR_TARGETS), "decoder": list(sets[decoder])}


def save_backbone(model: torch.nn.Module, cfg: dict, folder: str | os.PathLike, extra: dict | None = None) -> Path:
    """``model.safetensors`` + ``backbone.json`` (class and constructor arguments) in ``folder``, written
    atomically. The pair is what :func:`load_backbone` and the finetune recipe's ``model.pretrained`` read."""
    from safetensors.torch import save_file

    from .._atomic import atomic_write, atomic_write_text

    folder = Path(folder)
    name, kw = model_kwargs(cfg)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(folder / "model.safetensors", lambda tmp: save_file(state, tmp))
    atomic_write_text(folder / "backbone.json", json.dumps({"name": name, "kwargs": kw, **(extra or {})}, indent=1))
    return folder


def load_backbone(folder: str | os.PathLike, cfg: dict | None = None) -> tuple[torch.nn.Module, dict]:
    """Rebuild the backbone saved by :func:`save_backbone`. ``cfg`` (if given) must agree on the architecture."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "backbone.json").is_file():
        raise FileNotFoundError(
            f"{folder} has no backbone.json: not a pretrained backbone folder (run pretrain first)")
    meta = json.loads((folder / "backbone.json").read_text())
    saved_cfg = {"name": meta["name"], **meta["kwargs"]}
    if cfg is not None:
        _, want = model_kwargs(cfg)
        _, have = model_kwargs(saved_cfg)
        diff = {k: (want[k], have.get(k)) for k in want if k != "dropout_rate" and want[k] != have.get(k)}
        if diff:
            raise ValueError(f"pretrained backbone in {folder} differs from model config: {diff} (config, saved)")
        saved_cfg["dropout_rate"] = model_kwargs(cfg)[1].get("dropout_rate", saved_cfg.get("dropout_rate"))
    model = build_model(saved_cfg)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model, saved_cfg
