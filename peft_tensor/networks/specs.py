"""Networks by dotted class path plus constructor arguments (MONAI's ``_target_`` convention), and the presets that say
which layers an adapter targets and which modules train beside it, per network class.

A network spec is a mapping ``{"_target_": "monai.networks.nets.UNETR", "in_channels": 1, ...}`` -- the form MONAI
bundle configs use for ``network_def``. ``_target_`` may also be a short MONAI name (``"UNETR"``, looked up in
``monai.networks.nets``) or one of our aliases (``"unetr"``, ``"swinunetr"``, ``"vit"``).

Presets (:func:`preset_for`) exist for UNETR, SwinUNETR (v1 and ``use_v2=True``: the same Linear layers and decoder),
ViT and ViTAutoEnc. A network of another class gets its targets from its own ``nn.Linear`` layers named like MONAI's
transformer blocks; a network with none is pointed to PEFT's LoRA, which adapts convolutions.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterable, Mapping

from torch import nn

from ..errors import PeftTensorError
from ..hub.provenance import BaseNetwork, import_network_class
from ..registry import SWINUNETR_TARGETS, UNETR_TARGETS

__all__ = ["NETWORK_ALIASES", "NetworkSpecError", "Preset", "DECODER_SETS", "build_from_spec", "class_path_of",
           "preset_for", "resolve_class_path", "split_spec", "spec_of", "SWIN_DECODER", "SWIN_DECODER_WIDE",
           "UNETR_DECODER", "UNETR_DECODER_WIDE", "HEAD", "VIT_TARGETS", "SWIN_TARGETS"]


class NetworkSpecError(PeftTensorError):
    """A network spec (``_target_`` + kwargs) cannot be resolved or built."""


NETWORK_ALIASES = MappingProxyType({
    "unetr": "monai.networks.nets.UNETR",
    "swinunetr": "monai.networks.nets.SwinUNETR",
    "vit": "monai.networks.nets.ViT",
    "vitautoenc": "monai.networks.nets.ViTAutoEnc",
})

# The Linear layers of MONAI's transformer blocks (``monai.networks.blocks``: SABlock / MLPBlock in ViT and UNETR,
# WindowAttention / MLPBlock / PatchMerging in SwinUNETR), as PEFT ``target_modules`` suffixes.
VIT_TARGETS, SWIN_TARGETS = UNETR_TARGETS, SWINUNETR_TARGETS  # the registry's, named per block family

# What the papers train beside the adapter (the "decoder"): UNETR decoder2-5 + head, 2,678,562 parameters in UNETR-B
# (tCURLoRA r=8 then trains the paper's 2,683,170); SwinUNETR decoder1-5 + head, 19,597,922 in SwinUNETR-48 (HyPS).
# The convolutional skip encoders (encoder1-4, and encoder10 in SwinUNETR) stay frozen there.
UNETR_DECODER = ("decoder2", "decoder3", "decoder4", "decoder5", "out.conv.conv")
SWIN_DECODER = ("decoder1", "decoder2", "decoder3", "decoder4", "decoder5", "out.conv.conv")
HEAD = ("out.conv.conv",)
# The wider set the recipes trained before (the skip encoders too), the arm option ``decoder: wide``.
UNETR_DECODER_WIDE = ("encoder1", "encoder2", "encoder3", "encoder4", *UNETR_DECODER)
SWIN_DECODER_WIDE = ("encoder1", "encoder2", "encoder3", "encoder4", "encoder10", *SWIN_DECODER)
DECODER_SETS = ("paper", "wide", "head")


@dataclass(frozen=True)
class Preset:
    """Targets and decoder sets of one network class.

    Attributes:
        backbone: short name (``"unetr"``, ``"swinunetr"``, ``"vit"``, ...); the key of per-backbone tables such as a
            method's registry ``targets``.
        target_modules: PEFT ``target_modules`` (Linear-layer name suffixes) the methods adapt.
        decoder: modules trained beside the adapter, per decoder set (``paper``, ``wide``, ``head``).
    """

    backbone: str
    target_modules: tuple[str, ...]
    decoder: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def decoder_set(self, name: str = "paper") -> list[str]:
        if name not in DECODER_SETS:
            raise ValueError(f"unknown decoder set {name!r}: use one of {', '.join(DECODER_SETS)}")
        return list(self.decoder.get(name, ()))


def _unetr(kwargs: Mapping) -> Preset:
    return Preset("unetr", VIT_TARGETS, {"paper": UNETR_DECODER, "wide": UNETR_DECODER_WIDE, "head": HEAD})


def _swinunetr(kwargs: Mapping) -> Preset:
    # use_v2=True adds residual conv blocks (swinViT.layers1c..4c) to the encoder: same Linear layers, same decoder
    return Preset("swinunetr", SWIN_TARGETS, {"paper": SWIN_DECODER, "wide": SWIN_DECODER_WIDE, "head": HEAD})


def _vit(kwargs: Mapping) -> Preset:
    head = ("classification_head",) if kwargs.get("classification") else ("norm",)
    return Preset("vit", VIT_TARGETS, {"paper": head, "wide": tuple(dict.fromkeys(("norm", *head))), "head": head})


def _vitautoenc(kwargs: Mapping) -> Preset:
    up = ("conv3d_transpose", "conv3d_transpose_1")
    return Preset("vitautoenc", VIT_TARGETS, {"paper": up, "wide": ("norm", *up), "head": ("conv3d_transpose_1",)})


_PRESETS = {
    "monai.networks.nets.UNETR": _unetr,
    "monai.networks.nets.SwinUNETR": _swinunetr,
    "monai.networks.nets.ViT": _vit,
    "monai.networks.nets.ViTAutoEnc": _vitautoenc,
}
# the defining modules, so that "monai.networks.nets.unetr.UNETR" finds the same preset
_PRESETS.update({
    "monai.networks.nets.unetr.UNETR": _unetr,
    "monai.networks.nets.swin_unetr.SwinUNETR": _swinunetr,
    "monai.networks.nets.vit.ViT": _vit,
    "monai.networks.nets.vitautoenc.ViTAutoEnc": _vitautoenc,
})


def resolve_class_path(target: str) -> str:
    """Dotted class path of a ``_target_``: an alias (``unetr``), a short MONAI network name (``UNETR``, looked up in
    ``monai.networks.nets``) or a dotted path (returned as is)."""
    if not isinstance(target, str) or not target:
        raise NetworkSpecError(
            f"_target_ must be a class path string like 'monai.networks.nets.UNETR', got {target!r}")
    if target.lower() in NETWORK_ALIASES:
        return NETWORK_ALIASES[target.lower()]
    if "." in target:
        return target
    import monai.networks.nets as nets

    if isinstance(getattr(nets, target, None), type):
        return f"monai.networks.nets.{target}"
    raise NetworkSpecError(
        f"_target_ {target!r} is neither a MONAI network in monai.networks.nets nor a dotted class path; write the "
        "full path, e.g. 'monai.networks.nets.UNETR' or 'my_package.models.MyNet'.")


def split_spec(spec: Mapping) -> tuple[str, dict]:
    """``{"_target_": path, **kwargs}`` -> (class path, kwargs). Keys starting with ``_`` other than ``_target_``
    (MONAI's ``_requires_``, ``_disabled_``, ``_desc_``, ``_mode_``) are not constructor arguments and are dropped."""
    if not isinstance(spec, Mapping) or "_target_" not in spec:
        raise NetworkSpecError(
            f"a network spec is a mapping with a '_target_' class path plus constructor arguments, e.g. "
            f"{{'_target_': 'monai.networks.nets.UNETR', 'in_channels': 1, ...}}; got {spec!r}")
    kwargs = {k: copy.deepcopy(v) for k, v in spec.items() if not str(k).startswith("_")}
    if spec.get("_disabled_") in (True, "true", "True"):
        raise NetworkSpecError("the network spec is marked _disabled_: nothing to build")
    return resolve_class_path(spec["_target_"]), kwargs


def build_from_spec(class_path: str, kwargs: Mapping | None = None, *,
                    trusted_module_roots: tuple[str, ...] | None = None, trust_remote_code: bool = False,
                    trusted_args: Iterable[str] = ()) -> nn.Module:
    """``class_path(**kwargs)`` for an ``nn.Module`` class (anything else is refused, never called), with the
    provenance record attached so that an adapter trained on it records its base network.

    ``trusted_module_roots``: ``None`` for specs written in code (any class, any argument); pass
    :data:`~peft_tensor.hub.provenance.TRUSTED_MODULE_ROOTS` for specs read from files: then the class must be on
    the allow-list and no argument may read files or URLs unless ``trust_remote_code`` (see
    :meth:`~peft_tensor.hub.provenance.BaseNetwork.build`); ``trusted_args`` names the arguments the caller added in
    code.
    """
    from ..hub.provenance import ProvenanceError, _to_json, check_network_args, decode_value

    class_path = resolve_class_path(class_path)
    klass = import_network_class(class_path, trusted_module_roots, trust_remote_code=trust_remote_code)
    trusted_args = tuple(trusted_args)
    try:
        record = BaseNetwork(class_path, _to_json(dict(kwargs or {}), class_path))
    except ProvenanceError:  # not JSON-representable: still buildable, but not recordable
        record = None
    try:
        if record is not None:
            return record.build(trusted_module_roots=trusted_module_roots, trust_remote_code=trust_remote_code,
                                trusted_args=trusted_args)
        if trusted_module_roots is not None:  # values from a file: JSON only, arguments checked
            from_file = {k: v for k, v in dict(kwargs or {}).items() if k not in trusted_args}
            decode_value(from_file, f"{class_path} kwargs")
            check_network_args(klass, dict(kwargs or {}), class_path, trust_remote_code=trust_remote_code,
                               trusted_args=trusted_args)
        return klass(**dict(kwargs or {}))
    except TypeError as exc:
        raise NetworkSpecError(f"{class_path}(**{dict(kwargs or {})!r}) failed: {exc}. Check the constructor "
                               "arguments against the class's signature.") from exc


def class_path_of(network: nn.Module) -> str:
    """The network's class as a dotted path: the one it was built by (``monai.networks.nets.UNETR``) when recorded,
    else its defining module's."""
    base = network.get_base_model() if hasattr(network, "get_base_model") else network
    spec = spec_of(base)
    if spec is not None:
        return spec["_target_"]
    return f"{type(base).__module__}.{type(base).__qualname__}"


def spec_of(network: nn.Module) -> dict | None:
    """``{"_target_": ..., **kwargs}`` of a network built through :func:`build_from_spec` / the hub's
    ``build_network`` / ``record_network``; ``None`` when the network carries no record."""
    from ..hub.provenance import ProvenanceError, describe_network

    try:
        record = describe_network(network)
    except ProvenanceError:
        return None
    if record.config is not None:
        return None
    return {"_target_": record.cls, **copy.deepcopy(record.kwargs)}


def preset_for(class_path: str, kwargs: Mapping | None = None, network: nn.Module | None = None) -> Preset:
    """Targets and decoder sets for a network class. Classes without a preset get targets discovered from
    ``network`` (built on the meta device from ``kwargs`` when not given): the Linear layers named like MONAI's
    transformer blocks; their decoder sets are empty (set ``modules_to_save`` yourself).

    Raises:
        NetworkSpecError: the network has no such Linear layer (a convolutional network: name its convolutions).
    """
    class_path = resolve_class_path(class_path)
    kwargs = dict(kwargs or {})
    if class_path in _PRESETS:
        return _PRESETS[class_path](kwargs)
    if network is None:
        network = _meta_build(class_path, kwargs)
    linear = [n for n, m in network.named_modules() if isinstance(m, nn.Linear)]
    found = tuple(t for t in dict.fromkeys((*VIT_TARGETS, *SWIN_TARGETS))
                  if any(n == t or n.endswith("." + t) for n in linear))
    if not found:
        what = (f"its nn.Linear layers ({', '.join(sorted({'.'.join(n.split('.')[-2:]) for n in linear})[:8])}) are "
                "not named like MONAI's transformer blocks: pass target_modules yourself") if linear else (
            "it has no nn.Linear layer at all (a convolutional network?); peft_tensor's methods adapt its "
            "convolutions too: pass target_modules naming them (e.g. 'conv'), or use an arm <method>_full")
        raise NetworkSpecError(f"no target preset for {class_path}: {what}.")
    return Preset(class_path.rsplit(".", 1)[-1].lower(), found, {})


def _meta_build(class_path: str, kwargs: Mapping) -> nn.Module:
    import torch

    klass = import_network_class(class_path, None)
    from ..hub.provenance import decode_value

    kwargs = decode_value(copy.deepcopy(dict(kwargs)), f"{class_path} kwargs")
    try:
        with torch.device("meta"):
            return klass(**kwargs)
    except RuntimeError:  # constructors that read tensor values (.item()) do not run on meta: build it for real
        pass
    except Exception as exc:  # noqa: BLE001 - any constructor failure: report it with the spec
        raise NetworkSpecError(
            f"cannot build {class_path}(**{dict(kwargs)!r}) to find its target layers ({type(exc).__name__}: "
            f"{exc}); pass target_modules yourself.") from exc
    try:
        return klass(**copy.deepcopy(kwargs))
    except Exception as exc:  # noqa: BLE001 - any constructor failure: report it with the spec
        raise NetworkSpecError(
            f"cannot build {class_path}(**{dict(kwargs)!r}) to find its target layers ({type(exc).__name__}: "
            f"{exc}); pass target_modules yourself.") from exc
