"""Networks by dotted class path plus constructor arguments (MONAI's ``_target_`` convention), and the presets that say
which layers an adapter targets and which modules train beside it, per network class.

A network spec is a mapping ``{"_target_": "monai.networks.nets.UNETR", "in_channels": 1, ...}`` -- the form MONAI
bundle configs use for ``network_def``. ``_target_`` may also be a short MONAI name (``"UNETR"``, looked up in
``monai.networks.nets``) or one of our aliases (``"unetr"``, ``"swinunetr"``, ``"vit"``).

Presets (:func:`preset_for`) are the default targets of every method (``target_modules=None``) and the modules the
papers train beside the adapter: UNETR, SwinUNETR (v1 and ``use_v2=True``, whose encoder's residual convolutions are
targets too), ViT and ViTAutoEnc (their transformer blocks' Linear layers) and the CNNs SegResNet, UNet, DynUNet,
BasicUNet and AttentionUnet (every convolution with a kernel larger than 1). A network of another class gets its
targets from its own ``nn.Linear`` layers named like MONAI's transformer blocks; one with none is refused with names
of its layers that ``target_modules`` can take.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterable, Mapping

from torch import nn

from ..errors import PeftTensorError
from ..hub.provenance import BaseNetwork, import_network_class
from ..registry import SWINUNETR_TARGETS, UNETR_TARGETS

__all__ = ["NETWORK_ALIASES", "NetworkSpecError", "Preset", "DECODER_SETS", "PRESET_NETWORKS", "build_from_spec",
           "class_path_of", "distinct_suffixes", "preset_for", "resolve_class_path", "split_spec", "spec_of",
           "SWIN_DECODER", "SWIN_DECODER_WIDE", "SWIN_V2_CONVS", "UNETR_DECODER", "UNETR_DECODER_WIDE", "HEAD",
           "VIT_TARGETS", "SWIN_TARGETS"]


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
        backbone: short name (``"unetr"``, ``"swinunetr"``, ``"segresnet"``, ...); the key of per-backbone tables such
            as a method's registry ``targets``.
        target_modules: PEFT ``target_modules`` (module-name suffixes) that every method adapts by default: the
            transformer blocks' Linear layers (UNETR, SwinUNETR, ViT, ViTAutoEnc; SwinUNETR v2 also its encoder's
            residual convolutions), or every convolution with a kernel larger than 1 (the CNNs).
        decoder: modules trained beside the adapter, per decoder set (``paper``, ``wide``, ``head``).
    """

    backbone: str
    target_modules: tuple[str, ...]
    decoder: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def decoder_set(self, name: str = "paper") -> list[str]:
        if name not in DECODER_SETS:
            raise ValueError(f"unknown decoder set {name!r}: use one of {', '.join(DECODER_SETS)}")
        return list(self.decoder.get(name, ()))


class _Network:
    """What a preset is computed from: the constructor arguments and, built on first use (on the meta device), the
    network itself."""

    def __init__(self, class_path: str, kwargs: Mapping, module: nn.Module | None = None):
        self.class_path, self.kwargs, self._module = class_path, dict(kwargs), module
        self.given = module is not None

    def module(self) -> nn.Module:
        if self._module is None:
            self._module = _meta_build(self.class_path, self.kwargs)
        return self._module

    def arg(self, name: str, default=None):
        """A constructor argument: from the spec, else (a network given as an instance) its attribute."""
        if name in self.kwargs:
            return self.kwargs[name]
        return getattr(self._module, name, default) if self.given else default


# SwinUNETR(use_v2=True): a residual convolution block after each Swin stage (swinViT.layers1c ... layers4c, one
# UnetResBlock each): encoder layers the Linear targets do not reach.
SWIN_V2_CONVS = tuple(f"layers{i}c.0.layer.conv{j}.conv" for i in range(1, 5) for j in (1, 2))


def _unetr(net: _Network) -> Preset:
    return Preset("unetr", VIT_TARGETS, {"paper": UNETR_DECODER, "wide": UNETR_DECODER_WIDE, "head": HEAD})


def _swinunetr(net: _Network) -> Preset:
    sets = {"paper": SWIN_DECODER, "wide": SWIN_DECODER_WIDE, "head": HEAD}
    v2 = net.arg("use_v2") if "use_v2" in net.kwargs or not net.given else hasattr(
        getattr(net.module(), "swinViT", None), "layers1c")
    # use_v2=True adds residual conv blocks to the encoder: the same Linear layers and decoder, plus those blocks
    return Preset("swinunetr", (*SWIN_TARGETS, *SWIN_V2_CONVS) if v2 else SWIN_TARGETS, sets)


def _vit(net: _Network) -> Preset:
    head = ("classification_head",) if net.arg("classification") else ("norm",)
    return Preset("vit", VIT_TARGETS, {"paper": head, "wide": tuple(dict.fromkeys(("norm", *head))), "head": head})


def _vitautoenc(net: _Network) -> Preset:
    up = ("conv3d_transpose", "conv3d_transpose_1")
    return Preset("vitautoenc", VIT_TARGETS, {"paper": up, "wide": ("norm", *up), "head": ("conv3d_transpose_1",)})


def _cnn(backbone: str, heads: tuple[str, ...]):
    """A CNN's preset: every ``groups=1`` convolution with a kernel larger than 1 (transposed ones included), named by
    the shortest suffixes that match those and nothing else (the 1x1x1 convolutions stay out: they are the head and
    channel projections); the 1x1x1 output head (those of ``heads`` the network has) trains beside the adapter."""

    def preset(net: _Network) -> Preset:
        module = net.module()
        names = [n for n, _ in _named_layers(module)]
        chosen = [n for n, m in _named_layers(module) if _is_spatial_conv(m)]
        head = tuple(h for h in heads if h in names)
        return Preset(backbone, tuple(distinct_suffixes(chosen, names)), {"paper": head, "wide": head, "head": head})

    return preset


_PRESET_CLASSES = {  # defining module path -> preset
    "monai.networks.nets.unetr.UNETR": _unetr,
    "monai.networks.nets.swin_unetr.SwinUNETR": _swinunetr,
    "monai.networks.nets.vit.ViT": _vit,
    "monai.networks.nets.vitautoenc.ViTAutoEnc": _vitautoenc,
    "monai.networks.nets.segresnet.SegResNet": _cnn("segresnet", ("conv_final",)),
    "monai.networks.nets.unet.UNet": _cnn("unet", ()),  # its last up-sampling convolution is the head: adapted
    "monai.networks.nets.dynunet.DynUNet": _cnn("dynunet", ("output_block", "deep_supervision_heads")),
    "monai.networks.nets.basic_unet.BasicUNet": _cnn("basicunet", ("final_conv",)),
    "monai.networks.nets.attentionunet.AttentionUnet": _cnn("attentionunet", ("model.2",)),
}
# the public names, so that "monai.networks.nets.UNETR" finds the same preset without an import
_PRESETS = {**_PRESET_CLASSES, **{f"monai.networks.nets.{p.rsplit('.', 1)[1]}": f for p, f in _PRESET_CLASSES.items()}}
#: The network classes with a preset, by their MONAI names.
PRESET_NETWORKS = tuple(p.rsplit(".", 1)[1] for p in _PRESET_CLASSES)


def _named_layers(module: nn.Module):
    """``(name, layer)`` of every module, PEFT's wrappers seen through (their base layer under the wrapper's name) and
    their internals (``base_layer``, ``modules_to_save``, adapter sub-modules) left out."""
    from .._peft_compat import BaseTunerLayer

    skip = ("base_layer", "modules_to_save", "original_module")
    wrappers: list[str] = []
    for name, m in module.named_modules():
        if not name or any(p in skip for p in name.split(".")) or any(name.startswith(w) for w in wrappers):
            continue
        if isinstance(m, BaseTunerLayer):
            wrappers.append(name + ".")
            m = m.get_base_layer()
        yield name, m


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _is_spatial_conv(m: nn.Module) -> bool:
    return isinstance(m, _CONVS) and m.groups == 1 and math.prod(int(k) for k in m.kernel_size) > 1


def distinct_suffixes(chosen: Iterable[str], names: Iterable[str]) -> list[str]:
    """PEFT ``target_modules`` suffixes that together match exactly the modules ``chosen`` among ``names``: per chosen
    name its shortest suffix of at least two parts that starts with a name, not an index (``'conv1.conv'``,
    ``'down_layers.3.0.conv'``), and matches no other name; in module order."""
    chosen, names = list(chosen), list(names)
    wanted = set(chosen)
    out: dict[str, None] = {}
    for name in chosen:
        parts = name.split(".")
        for size in range(min(2, len(parts)), len(parts) + 1):
            suffix = ".".join(parts[-size:])
            if parts[-size].isdigit() and size < len(parts):
                continue
            if all(n in wanted for n in names if n == suffix or n.endswith("." + suffix)):
                out.setdefault(suffix)
                break
    return list(out)


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


def preset_for(network: str | nn.Module, kwargs: Mapping | None = None, module: nn.Module | None = None) -> Preset:
    """The default targets and decoder sets of a network: what ``TCURLoraConfig()`` / ``LoraPTConfig()`` /
    ``HyPSConfig()`` with ``target_modules=None`` adapt (``Preset.target_modules``) and what the papers train beside
    the adapter (``Preset.decoder_set("paper")``).

    ``network``: a network (``preset_for(model)``; a ``PeftModel`` is seen through) or a class path / MONAI name /
    alias with its constructor ``kwargs`` (``preset_for("SegResNet", {"in_channels": 1, ...})``; the network is then
    built on the meta device where its preset depends on its layers). ``module``: the network built from those, if
    at hand.

    Presets: UNETR, ViT, ViTAutoEnc (the transformer blocks' Linear layers), SwinUNETR (its Swin blocks' Linear layers
    and patch-merging reductions; v2 also its encoder's residual convolutions), and the CNNs SegResNet, UNet, DynUNet,
    BasicUNet, AttentionUnet (every convolution with a kernel larger than 1; decoder sets: their 1x1x1 output head). A
    subclass gets its base class's preset. Other classes get the Linear layers named like MONAI's transformer blocks;
    their decoder sets are empty (set ``modules_to_save`` yourself).

    Raises:
        NetworkSpecError: a class without a preset and without such Linear layers (pass ``target_modules`` naming its
            layers; the message lists names that work).
    """
    if isinstance(network, nn.Module):
        module = _unwrap(network)
        spec = spec_of(module)
        class_path = spec["_target_"] if spec is not None else f"{type(module).__module__}.{type(module).__qualname__}"
        kwargs = {k: v for k, v in (spec or {}).items() if k != "_target_"} if kwargs is None else kwargs
    else:
        class_path = resolve_class_path(network)
    net = _Network(class_path, kwargs or {}, module)
    factory = _PRESETS.get(class_path)
    if factory is None:
        for klass in type(net.module()).__mro__:  # a subclass, or a MONAI class by another import path
            factory = _PRESETS.get(f"{klass.__module__}.{klass.__qualname__}")
            if factory is not None:
                break
    if factory is not None:
        return factory(net)
    layers = list(_named_layers(net.module()))
    linear = [n for n, m in layers if isinstance(m, nn.Linear)]
    found = tuple(t for t in dict.fromkeys((*VIT_TARGETS, *SWIN_TARGETS))
                  if any(n == t or n.endswith("." + t) for n in linear))
    if not found:
        names = [n for n, _ in layers]
        adaptable = [n for n, m in layers if isinstance(m, nn.Linear) or (isinstance(m, _CONVS) and m.groups == 1)]
        example = distinct_suffixes(adaptable, names)[:6]
        raise NetworkSpecError(
            f"{class_path.rsplit('.', 1)[-1]} has no target preset (presets: {', '.join(PRESET_NETWORKS)}): pass "
            f"target_modules naming the layers to adapt" + (f", e.g. {example}." if example else
                                                            "; it has no nn.Linear or convolution layer to adapt."))
    return Preset(class_path.rsplit(".", 1)[-1].lower(), found, {})


def _unwrap(network: nn.Module) -> nn.Module:
    """The base network of a ``PeftModel`` / tuner (``get_base_model``), else ``network`` itself."""
    if hasattr(network, "get_base_model"):
        return network.get_base_model()
    return network


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
