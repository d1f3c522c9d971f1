"""Backbones from config dicts, and the files that record which backbone a checkpoint belongs to.

A model config names its network either by ``name`` (``unetr`` / ``swinunetr``, with the papers' UNETR-B /
SwinUNETR-48 defaults filled in) or, MONAI's ``_target_`` convention, by dotted class path plus constructor
arguments (``{_target_: monai.networks.nets.SwinUNETR, in_channels: 1, out_channels: 3, use_v2: true}``; MONAI's own
defaults apply). ``pretrained`` may name anything :func:`peft_tensor.load_network` reads.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from ..networks import specs as _specs

logger = logging.getLogger(__name__)

# What the papers train beside the adapter in every PEFT arm (the "decoder"), and the wider and head-only sets: the
# presets of peft_tensor.networks.specs (UNETR decoder2-5 + head: 2,678,562 parameters in UNETR-B; SwinUNETR decoder1-5
# + head: 19,597,922 in SwinUNETR-48).
UNETR_DECODER = list(_specs.UNETR_DECODER)
SWIN_DECODER = list(_specs.SWIN_DECODER)
HEAD = list(_specs.HEAD)
UNETR_DECODER_WIDE = list(_specs.UNETR_DECODER_WIDE)
SWIN_DECODER_WIDE = list(_specs.SWIN_DECODER_WIDE)
DECODER_SETS = _specs.DECODER_SETS

_UNETR_DEFAULTS = dict(in_channels=1, out_channels=2, img_size=128, feature_size=16, hidden_size=768, mlp_dim=3072,
                       num_heads=12, proj_type="conv", norm_name="instance", dropout_rate=0.1, qkv_bias=False)
_SWIN_DEFAULTS = dict(in_channels=1, out_channels=2, feature_size=48, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24))


def model_kwargs(cfg: dict) -> tuple[str, dict]:
    """(name, constructor kwargs) with defaults filled in (UNETR-B / SwinUNETR-48 as in the papers). For a
    ``_target_`` config: (dotted class path, its constructor arguments as given)."""
    if "_target_" in dict(cfg):
        try:
            return _specs.split_spec({k: v for k, v in dict(cfg).items() if k != "pretrained"})
        except _specs.NetworkSpecError as exc:
            raise ValueError(f"model config: {exc}") from None
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
    """The network of ``cfg``: a MONAI UNETR or SwinUNETR by ``name`` (plus constructor arguments), or any
    ``nn.Module`` class by ``_target_`` (dotted class path; a short MONAI name such as ``UNETR`` works too) plus its
    constructor arguments. The network carries its class path and arguments (an adapter trained on it records them)."""
    name, kw = model_kwargs(cfg)
    if "_target_" in dict(cfg):
        return _specs.build_from_spec(name, kw)
    if name == "unetr":
        from monai.networks.nets import UNETR

        return UNETR(**{**kw, "img_size": tuple(kw["img_size"])})
    from monai.networks.nets import SwinUNETR

    return SwinUNETR(**{**kw, "depths": tuple(kw["depths"]), "num_heads": tuple(kw["num_heads"])})


def defaults_for(cfg: dict, decoder: str = "paper") -> dict:
    """Targets and the modules trained beside the adapter for the backbone of ``cfg``: the network's preset
    (:func:`peft_tensor.preset_for`: UNETR, SwinUNETR v1/v2, ViT, ViTAutoEnc, and the CNNs SegResNet, UNet, DynUNet,
    BasicUNet, AttentionUnet; other classes: Linear targets found by name, no decoder set -- set
    ``arm.modules_to_save``). ``decoder``: ``"paper"`` (the papers' decoder + head, the default), ``"wide"`` (also the
    convolutional skip encoders) or ``"head"`` (the output head only: the adapter alone). Also returns ``backbone``,
    the preset's short name.

    Raises:
        ValueError: a class without a preset whose targets cannot be found by name (the message names layers that
            ``target_modules`` can take).
    """
    if decoder not in DECODER_SETS:
        raise ValueError(f"unknown decoder set {decoder!r}: use one of {', '.join(DECODER_SETS)}")
    class_path, kwargs = model_kwargs(cfg)
    if "_target_" not in dict(cfg):
        class_path = _specs.NETWORK_ALIASES[class_path]
    try:
        preset = _specs.preset_for(class_path, kwargs)
    except _specs.NetworkSpecError as exc:
        raise ValueError(str(exc)) from None
    if not preset.decoder_set(decoder) and decoder != "head":
        logger.warning("no decoder preset for %s: only the adapter trains unless arm.modules_to_save is set",
                       class_path)
    return {"target_modules": list(preset.target_modules), "decoder": preset.decoder_set(decoder),
            "backbone": preset.backbone}


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


def load_backbone(source: str | os.PathLike, cfg: dict | None = None) -> tuple[torch.nn.Module, dict]:
    """The pretrained network named by ``source`` (the recipes' ``model.pretrained``) and its model config.

    ``source``: a folder written by :func:`save_backbone` (``cfg``, if given, must agree on the architecture), or
    anything :func:`peft_tensor.load_network` reads -- a MONAI bundle folder or name, a folder / Hub repo with
    ``peft_tensor.json``, or a checkpoint file, which is loaded into ``build_model(cfg)``. For bundles and provenance
    folders the constructor arguments written in ``cfg`` (besides ``name`` / ``_target_``) override the source's, e.g.
    ``out_channels: 2`` for a new head (the checkpoint's head is then reported as mismatched and re-initialised). The
    load report is printed.
    """
    from ..networks import load_network
    from ..networks.load import NetworkLoadError

    folder = Path(source)
    if (folder / "backbone.json").is_file():
        return _load_backbone_folder(folder, cfg)
    try:
        if folder.is_file():
            if cfg is None:
                raise ValueError(f"{source} is a checkpoint file: a model config is needed to build its network")
            model, report = load_network(folder, network=build_model(cfg))
        else:
            overrides = {k: v for k, v in dict(cfg or {}).items()
                         if k not in ("name", "_target_", "pretrained") and not str(k).startswith("_")}
            if str(dict(cfg or {}).get("name", "")).lower() == "swinunetr":
                overrides.pop("img_size", None)  # as model_kwargs: today's SwinUNETR takes no img_size
            model, report = load_network(source, **overrides)
    except (NetworkLoadError, _specs.NetworkSpecError) as exc:
        raise ValueError(f"model.pretrained={source}: {exc}") from None
    if cfg is not None and not folder.is_file():
        want = _class_of(cfg)
        if want is not None and want != report.network:
            raise ValueError(f"model.pretrained={source} is a {report.network}, but the model config names {want}; "
                             "change model.name / model._target_ or the pretrained source.")
    print(report)
    spec = _specs.spec_of(model)
    return model, spec if spec is not None else dict(cfg or {})


def _class_of(cfg: dict) -> str | None:
    cfg = dict(cfg)
    if "_target_" in cfg:
        return _specs.resolve_class_path(cfg["_target_"])
    if "name" in cfg:
        return _specs.NETWORK_ALIASES.get(str(cfg["name"]).lower())
    return None


def _load_backbone_folder(folder: Path, cfg: dict | None) -> tuple[torch.nn.Module, dict]:
    """Rebuild the backbone saved by :func:`save_backbone`. ``cfg`` (if given) must agree on the architecture."""
    from ..networks.load import load_backbone_folder, read_backbone_meta

    name, kwargs = read_backbone_meta(folder)
    saved_cfg = {"_target_" if "." in str(name) else "name": name, **kwargs}  # a dotted name: a _target_ backbone
    _check_saved_backbone(folder, saved_cfg)
    if cfg is not None:
        _, want = model_kwargs(cfg)
        _, have = model_kwargs(saved_cfg)
        diff = {k: (want[k], have.get(k)) for k in want if k != "dropout_rate" and want[k] != have.get(k)}
        head_only = set(diff) == {"out_channels"}
        if diff and not head_only:
            raise ValueError(f"pretrained backbone in {folder} differs from model config: {diff} (config, saved)")
        if "dropout_rate" in want or "_target_" not in saved_cfg:
            saved_cfg["dropout_rate"] = want.get("dropout_rate", saved_cfg.get("dropout_rate"))
        if head_only:  # e.g. a binary-pretrained backbone fine-tuned on a K-class task: a fresh head, reported
            saved_cfg["out_channels"] = want["out_channels"]
            model, report = load_backbone_folder(folder, build_model(saved_cfg))
            print(report)
            return model, saved_cfg
    model, _ = load_backbone_folder(folder, build_model(saved_cfg), strict=True)
    return model, saved_cfg


def _check_saved_backbone(folder: Path, saved_cfg: dict) -> None:
    """``backbone.json`` is a file like any other (a colleague's run folder, a download): its class must be on the
    loaders' allow-list and its arguments pass their checks, before anything is imported or built from it, unless
    the run trusts remote code (``peft-tensor run --trust-remote-code``)."""
    from ..hub.provenance import (ProvenanceError, check_network_args, decode_value, import_network_class,
                                  remote_code_trusted)

    if remote_code_trusted():
        return
    class_path = _class_of(saved_cfg) if "_target_" in saved_cfg else _class_of({"name": saved_cfg.get("name")})
    if class_path is None:  # a short recipe name (unetr, swinunetr): built by the recipes' own table
        return
    kwargs = {k: v for k, v in saved_cfg.items() if k not in ("_target_", "name")}
    try:
        klass = import_network_class(class_path)
        check_network_args(klass, decode_value(kwargs), class_path)
    except ProvenanceError as exc:
        raise ValueError(f"pretrained backbone in {folder}: {exc}") from None
