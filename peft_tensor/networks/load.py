"""Pretrained networks in, from whatever the user has: :func:`load_network` and its :class:`LoadReport`.

Sources (``load_network(source, ...)``):

- a MONAI bundle folder: ``configs/inference.json`` (or ``.yaml``) with ``network_def``, weights in
  ``models/model.safetensors`` or ``models/model.pt``; ``**overrides`` replace ``network_def`` arguments;
- a bundle name (``"spleen_ct_segmentation"``): taken from the bundle cache (``bundle_dir``, default
  ``<torch.hub dir>/bundle``), downloaded there with ``monai.bundle.download`` when missing and online;
- a folder (or Hub repo id) with ``peft_tensor.json`` (the base network and its weights, sha256-checked), or a
  ``backbone.json`` + ``model.safetensors`` folder written by the pretrain recipe;
- a checkpoint file (``.pt`` / ``.pth`` / ``.ckpt`` / ``.bin`` / ``.safetensors``) loaded into ``network``: a module,
  a dotted class path (built with ``**overrides``) or a ``{"_target_": ..., ...}`` spec.

Checkpoint layouts recognised: a flat state dict; one nested under ``state_dict`` / ``model`` / ``net`` / ``network``
(Lightning, MONAI ``CheckpointSaver``, research code); ``module.`` (DataParallel), ``_orig_mod.`` (torch.compile),
``model.`` / ``net.`` prefixes; the SwinUNETR self-supervised encoder (``model_swinvit.pt``: ``state_dict`` ->
``module.<swinViT key>`` with ``mlp.fc1`` / ``mlp.fc2``, what ``SwinUNETR.load_from`` reads; and the pretraining
code's own ``module.swin_vit.<key>``) whose SSL heads (``rotation_head``, ``contrastive_head``, ``conv``) are reported,
not loaded.

Files are read with ``torch.load(weights_only=True)`` or safetensors only; anything else that needs unpickling (a
whole pickled module, a Lightning file with hyper-parameter objects) is refused unless ``allow_pickle=True``.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import PartialLoadWarning, PeftTensorError
from ..hub.provenance import (
    PROVENANCE_FILE,
    TRUSTED_MODULE_ROOTS,
    BaseNetwork,
    import_network_class,
    remote_code_trusted,
)
from .specs import NetworkSpecError, build_from_spec, class_path_of, resolve_class_path, split_spec

__all__ = ["LoadReport", "NetworkLoadError", "load_network", "load_state", "read_checkpoint", "extract_state_dict",
           "CHECKPOINT_SUFFIXES"]

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".tar")
BUNDLE_CONFIGS = ("inference.json", "inference.yaml", "inference.yml", "train.json", "train.yaml", "train.yml")
BUNDLE_WEIGHTS = ("model.safetensors", "model.pt")
BACKBONE_META, BACKBONE_WEIGHTS = "backbone.json", "model.safetensors"  # a backbone folder (save_backbone)
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module")
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.", "net.", "network.")
SSL_HEADS = ("rotation_head", "rotation_pre", "contrastive_head", "contrastive_pre", "conv")
PARTIAL_LOAD_FRACTION = 0.9  # fewer of the network's tensors from the checkpoint: PartialLoadWarning


class NetworkLoadError(PeftTensorError):
    """A pretrained network cannot be loaded from the given source."""


# ---------------------------------------------------------------------------------------------------------- report
@dataclass
class LoadReport:
    """What a load did: tensors ``loaded``, network tensors ``missing`` from the checkpoint (left as initialised),
    checkpoint tensors ``unexpected`` by the network (not loaded), ``mismatched`` tensors ``(name, checkpoint shape,
    network shape)`` (left freshly initialised), how the checkpoint was read (``layout``) and ``notes``."""

    source: str
    network: str
    weights: str | None = None
    layout: list[str] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict, repr=False)  # element count of every network tensor
    scope: str = field(default="", repr=False)  # the part the checkpoint is for (a self-supervised encoder)

    @property
    def complete(self) -> bool:
        """Every network tensor came from the checkpoint and every checkpoint tensor was used."""
        return not (self.missing or self.unexpected or self.mismatched)

    @property
    def partial(self) -> bool:
        """Fewer than :data:`PARTIAL_LOAD_FRACTION` (90%) of the network's tensors came from the checkpoint (of the
        encoder's, for a self-supervised encoder checkpoint: its decoder is not part of that file by design)."""
        names = [*self.loaded, *self.missing, *(n for n, _, _ in self.mismatched)]
        total = sum(1 for n in names if n.startswith(self.scope))
        return sum(1 for n in self.loaded if n.startswith(self.scope)) < PARTIAL_LOAD_FRACTION * total

    def largest_unloaded(self, limit: int = 5) -> list[tuple[str, int]]:
        """The largest modules none of whose tensors came from the checkpoint, ``(module path, element count)``,
        largest first: the highest such ancestors (``vit`` when the whole encoder is missing, not its hundreds of
        tensors)."""
        unloaded = {n for n in [*self.missing, *(n for n, _, _ in self.mismatched)] if n.startswith(self.scope)}
        tensors: dict[str, int] = {}  # per module path: its tensors, those not loaded, their element count
        missing: dict[str, int] = {}
        values: dict[str, int] = {}
        for name in [*self.loaded, *unloaded]:
            parts = name.split(".")
            for prefix in {".".join(parts[:depth]) for depth in range(1, len(parts))} or {name}:
                tensors[prefix] = tensors.get(prefix, 0) + 1
                if name in unloaded:
                    missing[prefix] = missing.get(prefix, 0) + 1
                    values[prefix] = values.get(prefix, 0) + int(self.sizes.get(name, 0))
        whole = {p for p, n in missing.items() if n == tensors[p]}
        top = [p for p in whole if not any(p.startswith(q + ".") for q in whole)]
        return sorted(((p, values[p]) for p in top), key=lambda item: (-item[1], item[0]))[:limit]

    def partial_message(self) -> str:
        """What :class:`~peft_tensor.errors.PartialLoadWarning` says: how much loaded, the largest modules that did
        not, what to do."""
        names = [n for n in [*self.loaded, *self.missing, *(n for n, _, _ in self.mismatched)]
                 if n.startswith(self.scope)]
        loaded = [n for n in self.loaded if n.startswith(self.scope)]
        everything = sum(self.sizes.get(k, 0) for k in names) or 1
        share = sum(self.sizes.get(k, 0) for k in loaded)
        what = f"{self.network}'s encoder {self.scope}*" if self.scope else self.network
        modules = ", ".join(f"{p} ({_count(n)})" for p, n in self.largest_unloaded())
        return (f"{self.source}: only {len(loaded)} of {len(names)} tensors of {what} "
                f"({100 * share / everything:.0f}% of its values) came from the checkpoint; the rest keep their "
                f"random initialisation. Largest modules not loaded: {modules}. Check that the network's class and "
                "constructor arguments are the ones the checkpoint was saved from (print the LoadReport), or pass "
                "strict=True to refuse a partial load.")

    def to_dict(self) -> dict:
        return {"source": self.source, "network": self.network, "weights": self.weights, "layout": self.layout,
                "loaded": self.loaded, "missing": self.missing, "unexpected": self.unexpected,
                "mismatched": [[n, list(a), list(b)] for n, a, b in self.mismatched], "notes": self.notes}

    def __str__(self) -> str:
        head = f"LoadReport: {self.source} -> {self.network}"
        lines = [head]
        if self.weights and self.weights != self.source:
            lines.append(f"  weights     {self.weights}")
        if self.layout:
            lines.append(f"  layout      {'; '.join(self.layout)}")
        total = len(self.loaded) + len(self.missing) + len(self.mismatched)
        lines.append(f"  loaded      {len(self.loaded):>5} of {total} network tensors")
        lines.append(f"  missing     {len(self.missing):>5}  {_grouped(self.missing)}")
        lines.append(f"  unexpected  {len(self.unexpected):>5}  {_grouped(self.unexpected)}")
        mism = ", ".join(f"{n} {tuple(a)} vs {tuple(b)}" for n, a, b in self.mismatched[:3])
        more = f" (+{len(self.mismatched) - 3} more)" if len(self.mismatched) > 3 else ""
        mism = f"{mism}{more} (checkpoint vs network shape)" if mism else ""
        lines.append(f"  mismatched  {len(self.mismatched):>5}  {mism}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(line.rstrip() for line in lines)


def _grouped(names: list[str], limit: int = 6) -> str:
    """``decoder2.* (12), out.* (2)``: names grouped by their first component, for the table."""
    groups: dict[str, int] = {}
    for name in names:
        head = name.split(".", 1)[0]
        groups[head] = groups.get(head, 0) + 1
    single = {name.split(".", 1)[0]: name for name in names}
    parts = [f"{g}.* ({c})" if c > 1 else single[g] for g, c in list(groups.items())[:limit]]
    return ", ".join(parts) + (f", ... ({len(groups) - limit} more groups)" if len(groups) > limit else "")


# ---------------------------------------------------------------------------------------------------------- files
def read_checkpoint(path: str | os.PathLike, *, allow_pickle: bool = False) -> Any:
    """The object stored in a checkpoint file: safetensors, or ``torch.load(weights_only=True)``; with
    ``allow_pickle`` a full ``torch.load`` (only for files whose author you trust: unpickling can run code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as exc:
            raise NetworkLoadError(f"{path} is not a readable safetensors file ({exc}); it is damaged or was cut "
                                   "off while being written or downloaded.") from None
        except Exception as exc:  # noqa: BLE001 - whatever else malformed bytes raise: typed, with what was found
            raise _not_a_checkpoint(path, exc) from None
    if allow_pickle:
        try:
            return torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - EOFError, UnpicklingError, ... on bytes that are no checkpoint
            raise _not_a_checkpoint(path, exc) from None
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"unsupported global:? GLOBAL ([\w.]+)", str(exc), re.IGNORECASE)
        what = f"a pickled Python object ({found.group(1)})" if found else "pickled Python objects beyond tensors"
        raise NetworkLoadError(
            f"{path} holds {what}, e.g. a whole pickled network (torch.save(model)) or training state. Reading it "
            "means unpickling, which can run arbitrary code, so it is refused. If you trust the file's author, pass "
            "allow_pickle=True (CLI: --allow-pickle); better, re-save its state_dict (torch.save(model.state_dict())) "
            "or as safetensors.") from None
    except RuntimeError as exc:
        if "TorchScript" in str(exc) or "constants.pkl" in str(exc):
            raise NetworkLoadError(
                f"{path} is a TorchScript archive, not a checkpoint. Load it with torch.jit.load, or give the "
                "bundle's models/model.pt (the state dict).") from None
        raise NetworkLoadError(f"{path} is not a PyTorch checkpoint torch.load can read: {str(exc)[:300]}") from None
    except Exception as exc:  # noqa: BLE001 - EOFError, IndexError, KeyError(101), ... from bytes that are no pickle
        raise _not_a_checkpoint(path, exc) from None


def _not_a_checkpoint(path: Path, exc: BaseException) -> NetworkLoadError:
    """The typed error for a file whose bytes are no checkpoint: its first bytes and what the reader said."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError:
        head = b""
    reason = f"{type(exc).__name__}: {str(exc)[:200]}" if str(exc) else type(exc).__name__
    return NetworkLoadError(f"{path} is not a checkpoint torch.load or safetensors can read (first bytes {head!r}; "
                            f"{reason}). It is damaged, was cut off while being written or downloaded, or is another "
                            "kind of file.")


def extract_state_dict(obj: Any, layout: list[str] | None = None, _depth: int = 0) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint: a flat ``{name: tensor}``, a module, or one nested under
    ``state_dict`` / ``model`` / ``net`` / ``network`` (recorded in ``layout``)."""
    layout = layout if layout is not None else []
    if isinstance(obj, nn.Module):
        layout.append(f"a pickled {type(obj).__name__} module (its state_dict)")
        return dict(obj.state_dict())
    if not isinstance(obj, Mapping):
        raise NetworkLoadError(f"the checkpoint holds a {type(obj).__name__}, not a state dict (name -> tensor).")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if tensors and len(tensors) >= len(obj) / 2:
        dropped = [str(k) for k in obj if not isinstance(obj[k], torch.Tensor)]
        if dropped:
            layout.append(f"non-tensor entries ignored: {', '.join(dropped[:5])}")
        return tensors
    if _depth < 3:
        for key in NESTED_KEYS:
            if isinstance(obj.get(key), (Mapping, nn.Module)):
                layout.append(f"nested under {key!r}")
                return extract_state_dict(obj[key], layout, _depth + 1)
    raise NetworkLoadError(
        "found no state dict in the checkpoint: its top-level keys are "
        f"{', '.join(repr(k) for k in list(obj)[:10])}; expected tensors, or a dict under one of "
        f"{', '.join(NESTED_KEYS)}. Extract the network's state dict and save it (torch.save or safetensors).")


# ---------------------------------------------------------------------------------------------------------- keys
def _matches(keys, own: Mapping) -> int:
    return sum(1 for k in keys if k in own)


def _strip(state: dict, prefix: str) -> dict:
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


def _ssl_swin(state: dict, own: Mapping) -> dict:
    """SwinUNETR self-supervised layouts onto ``swinViT.``: ``swin_vit.<key>`` (the pretraining code's SSLHead) and
    bare encoder keys (``model_swinvit.pt`` after ``module.``), timm's ``mlp.fc1/fc2`` -> MONAI's ``linear1/2``."""
    out = {}
    for k, v in state.items():
        if k.startswith("swin_vit."):
            k = "swinViT." + k[len("swin_vit."):]
        elif re.match(r"(patch_embed|layers\d+c?|norm)\.", k) and "swinViT." + k not in state:
            k = "swinViT." + k
        if k.startswith("swinViT."):
            k = k.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")
        out[k] = v
    return out


def map_keys(state: dict[str, torch.Tensor], own: Mapping[str, torch.Tensor], layout: list[str]) -> dict:
    """Rename checkpoint keys to the network's: strip wrapper prefixes while that matches more keys, then the
    SwinUNETR self-supervised layout when the network has a ``swinViT`` encoder."""
    swin = any(k.startswith("swinViT.") for k in own)

    def score(candidate: dict) -> int:
        return max(_matches(candidate, own), _matches(_ssl_swin(candidate, own), own) if swin else 0)

    # wrapper prefixes, possibly stacked ('module._orig_mod.'): the shortest sequence of strips that fits best
    best_score, best_steps = score(state), []
    frontier = [(state, [])]
    for _ in range(3):
        grown = []
        for candidate, steps in frontier:
            for prefix in WRAPPER_PREFIXES:
                if any(k.startswith(prefix) for k in candidate):
                    stripped = _strip(candidate, prefix)
                    grown.append((stripped, steps + [prefix]))
                    if score(stripped) > best_score:
                        best_score, best_steps = score(stripped), steps + [prefix]
        frontier = grown
    for prefix in best_steps:
        n = sum(1 for k in state if k.startswith(prefix))
        layout.append(f"'{prefix}' prefix stripped ({n} keys)")
        state = _strip(state, prefix)
    if swin:
        mapped = _ssl_swin(state, own)
        if _matches(mapped, own) > _matches(state, own):
            layout.append("SwinUNETR self-supervised encoder layout (model_swinvit.pt): encoder keys -> swinViT.*, "
                          "mlp.fc1/fc2 -> mlp.linear1/linear2")
            state = mapped
    return state


# ---------------------------------------------------------------------------------------------------------- load
def load_state(network: nn.Module, checkpoint: Any, *, strict: bool = False, report: LoadReport | None = None,
               source: str = "state dict", warn: bool = True) -> LoadReport:
    """Load ``checkpoint`` (a loaded checkpoint object or state dict) into ``network`` and report.

    Tensors whose shape differs from the network's (a 14-class head into a 2-class network) are left as initialised
    and reported as ``mismatched``. With ``strict`` any missing, unexpected or mismatched tensor raises
    :class:`NetworkLoadError` before the network is changed. Without it, a load that fills fewer than 90% of the
    network's tensors warns (:class:`~peft_tensor.errors.PartialLoadWarning`, naming the largest modules left as
    initialised) unless ``warn`` is false.
    """
    from monai.networks.utils import copy_model_state

    report = report or LoadReport(source=source, network=class_path_of(network))
    state = extract_state_dict(checkpoint, report.layout)
    own = network.state_dict()
    state = map_keys(state, own, report.layout)
    report.loaded = [k for k in own if k in state and tuple(state[k].shape) == tuple(own[k].shape)]
    report.missing = [k for k in own if k not in state]
    report.unexpected = [k for k in state if k not in own]
    report.mismatched = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own
                         if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    heads = sorted({k.split(".", 1)[0] for k in report.unexpected if k.split(".", 1)[0] in SSL_HEADS})
    if heads and any("self-supervised" in line for line in report.layout):
        report.notes.append(f"self-supervised pretraining heads ({', '.join(heads)}) are not part of the network: "
                            "not loaded")
    if report.mismatched:
        report.notes.append("mismatched tensors keep the network's fresh initialisation (e.g. a new output head)")
    if not report.loaded:
        raise NetworkLoadError(
            f"{report.source}: no tensor of the checkpoint fits {report.network} (checkpoint keys such as "
            f"{', '.join(list(state)[:3])}; network keys such as {', '.join(list(own)[:3])}). It was saved from "
            "another network: build that one (network=...) or check the constructor arguments.")
    report.sizes = {k: int(v.numel()) for k, v in own.items()}
    if any("self-supervised encoder" in line for line in report.layout):
        report.scope = "swinViT."  # the file holds the encoder only: its decoder is not missing, it is not there
    partial = report.partial
    if partial:
        report.notes.append(f"only {len(report.loaded)} of {len(own)} network tensors came from the checkpoint: is "
                            "this the right network (class and constructor arguments)?")
    if strict and not report.complete:
        raise NetworkLoadError(f"strict load failed, nothing was changed:\n{report}\nPass strict=False to load what "
                               "fits and keep the rest as initialised.")
    dtypes = {str(state[k].dtype) for k in report.loaded if state[k].dtype != own[k].dtype}
    if dtypes:
        report.notes.append(f"checkpoint tensors in {', '.join(sorted(dtypes))} cast to the network's dtype")
    quiet = logging.getLogger("monai.networks.utils")  # copy_model_state logs "'dst' model updated" at INFO
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        copy_model_state(network, {k: state[k] for k in report.loaded}, inplace=True)
    finally:
        quiet.setLevel(level)
    if partial and warn:
        warnings.warn(report.partial_message(), PartialLoadWarning, stacklevel=2)
    return report


def _count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit} values"
    return f"{n} values"


def load_network(source: str | os.PathLike, *, network: nn.Module | str | Mapping | None = None,
                 strict: bool = False, allow_pickle: bool = False, bundle_dir: str | os.PathLike | None = None,
                 trusted_module_roots: tuple[str, ...] | None = TRUSTED_MODULE_ROOTS, trust_remote_code: bool = False,
                 **overrides) -> tuple[nn.Module, LoadReport]:
    """A pretrained network and a :class:`LoadReport` from a MONAI bundle, a bundle name, a provenance or backbone
    folder, a Hub repo id or a checkpoint file (see the module docstring for every source and layout).

    Args:
        source: bundle folder or name, folder or Hub repo id with ``peft_tensor.json`` / ``backbone.json``, or a
            checkpoint file.
        network: for checkpoint files: the network to load into -- a module, a dotted class path (built with
            ``**overrides``) or a ``{"_target_": ..., **kwargs}`` spec. For folders it replaces the recorded network.
        strict: raise on any missing, unexpected or mismatched tensor (the network is left unchanged).
        allow_pickle: accept files that need full unpickling (only from authors you trust).
        bundle_dir: the MONAI bundle cache for bundle names (default ``<torch.hub.get_dir()>/bundle``).
        trusted_module_roots: packages whose classes a bundle or provenance record may name: within the default
            roots only the allow-list of :func:`~peft_tensor.hub.provenance.import_network_class` (MONAI networks,
            transformers models, ``torch.nn``), never importing the module a file names; ``None``: any class and
            any constructor argument (the source is trusted like code).
        trust_remote_code: build classes outside the allow-list and pass constructor arguments that read files or
            fetch URLs (``pretrained_url``, ``cache_dir``, ...) from the source's config. Only for sources you
            trust; tagged values other than ``{"__torch_dtype__": NAME}`` are refused regardless.
        **overrides: constructor arguments replacing the bundle's ``network_def`` / the recorded ones, e.g.
            ``out_channels=3``; for checkpoint files, the arguments of a ``network`` given as a class path.

    Returns:
        ``(network, report)``; ``print(report)`` shows the table.

    Warns:
        :class:`~peft_tensor.errors.PartialLoadWarning` when fewer than 90% of the network's tensors came from the
        checkpoint (another network's weights, or other constructor arguments), naming the largest modules left
        as initialised; ``strict=True`` refuses any incomplete load instead.
    """
    net, report = _load_source(source, network, strict, allow_pickle, bundle_dir, trusted_module_roots,
                               trust_remote_code, overrides)
    if report.partial:  # a network that would train from mostly random weights: said where the user called
        warnings.warn(report.partial_message(), PartialLoadWarning, stacklevel=2)
    return net, report


def _load_source(source, network, strict, allow_pickle, bundle_dir, trusted_module_roots, trust_remote_code,
                 overrides) -> tuple[nn.Module, LoadReport]:
    if isinstance(source, nn.Module):
        raise NetworkLoadError("load_network(source) takes a path, bundle name or repo id; you passed a module. "
                               "To load a checkpoint into it: load_network('weights.pt', network=module).")
    if trust_remote_code or remote_code_trusted():
        trusted_module_roots = None  # the caller trusts the source like code: any class, any argument
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_folder(path, str(source), network, strict, allow_pickle, trusted_module_roots, overrides)
    if path.is_file() and path.suffix in (".json", ".yaml", ".yml") and path.parent.name == "configs":
        return _load_bundle(path.parent.parent, [path], str(source), network, strict, allow_pickle,
                            trusted_module_roots, overrides)  # a bundle's config file: that bundle, that config
    if path.is_file():
        return _load_file(path, network, strict, allow_pickle, overrides)
    text = str(source)
    if text.endswith(CHECKPOINT_SUFFIXES) or os.sep in text.strip("/") and text.count("/") != 1 or text.startswith(
            (".", "~", "/")):
        raise FileNotFoundError(f"{source} does not exist (expected a checkpoint file, a bundle folder or a folder "
                                "with peft_tensor.json / backbone.json)")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text):
        folder = _download_hub(text)
        return _load_folder(folder, text, network, strict, allow_pickle, trusted_module_roots, overrides)
    if re.fullmatch(r"[\w.-]+", text):
        folder = _bundle_from_cache(text, bundle_dir)
        return _load_folder(folder, text, network, strict, allow_pickle, trusted_module_roots, overrides)
    raise FileNotFoundError(f"{source!r} is neither an existing path, a Hub repo id (owner/name) nor a bundle name")


# ---------------------------------------------------------------------------------------------------------- sources
def _network_arg(network, overrides: dict, default: tuple[str, dict] | None, roots, where: str,
                 drop_unknown: bool = False) -> tuple[nn.Module, list[str]]:
    """The network to load into: the user's (module / class path / spec), else ``default`` (class path, kwargs)
    with ``overrides``. Returns it and notes."""
    notes: list[str] = []
    if isinstance(network, nn.Module):
        if overrides:
            raise NetworkLoadError(f"overrides {sorted(overrides)} cannot change an already built network; pass "
                                   "network as a class path or spec, or build it with those arguments.")
        return network, notes
    if isinstance(network, Mapping):
        class_path, kwargs = split_spec(network)
        return build_from_spec(class_path, {**kwargs, **overrides}), notes
    if isinstance(network, str):
        return build_from_spec(network, overrides), notes
    if network is not None:
        raise NetworkLoadError(f"network must be a module, a dotted class path or a _target_ spec, got "
                               f"{type(network).__name__}")
    if default is None:
        raise NetworkLoadError(
            f"{where} holds weights only; say which network they belong to: load_network(path, "
            "network='monai.networks.nets.UNETR', in_channels=1, out_channels=2, img_size=96, ...) or "
            "network=<your module>.")
    class_path, kwargs = default
    kwargs = {**kwargs, **overrides}
    if drop_unknown:
        klass = import_network_class(resolve_class_path(class_path), roots)
        accepted = _accepted_args(klass)
        stale = [k for k in kwargs if accepted is not None and k not in accepted and k not in overrides]
        for k in stale:
            notes.append(f"dropped {k}={kwargs.pop(k)!r} from network_def: this {class_path} no longer takes it")
    try:
        return build_from_spec(class_path, kwargs, trusted_module_roots=roots, trusted_args=overrides), notes
    except NetworkSpecError as exc:
        raise NetworkLoadError(f"{where}: {exc}") from None


def _accepted_args(klass) -> set[str] | None:
    try:
        params = inspect.signature(klass.__init__).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    return {n for n in params if n != "self"}


def _load_file(path: Path, network, strict, allow_pickle, overrides) -> tuple[nn.Module, LoadReport]:
    obj = read_checkpoint(path, allow_pickle=allow_pickle)
    if network is None and isinstance(obj, nn.Module):  # allow_pickle=True and a whole pickled network
        if overrides:
            raise NetworkLoadError(f"{path} holds a whole network; overrides {sorted(overrides)} cannot apply")
        report = LoadReport(source=str(path), network=class_path_of(obj), weights=str(path),
                            layout=["a pickled network (used as it is)"], loaded=list(obj.state_dict()))
        return obj, report
    net, notes = _network_arg(network, overrides, None, None, str(path))
    report = LoadReport(source=str(path), network=class_path_of(net), weights=str(path), notes=notes)
    return net, load_state(net, obj, strict=strict, report=report, warn=False)


def _load_folder(folder: Path, source: str, network, strict, allow_pickle, roots, overrides):
    configs = [folder / "configs" / name for name in BUNDLE_CONFIGS if (folder / "configs" / name).is_file()]
    if configs:
        return _load_bundle(folder, configs, source, network, strict, allow_pickle, roots, overrides)
    if (folder / PROVENANCE_FILE).is_file():
        return _load_provenance(folder, source, network, strict, roots, overrides)
    if (folder / BACKBONE_META).is_file():
        return _load_backbone(folder, network, strict, source, roots, overrides)
    listing = ", ".join(sorted(p.name for p in folder.iterdir())[:12]) or "nothing"
    raise NetworkLoadError(
        f"{folder} is not a network folder: expected a MONAI bundle (configs/inference.json + models/model.pt), "
        f"{PROVENANCE_FILE} or backbone.json; it holds {listing}. For a checkpoint file, pass the file itself.")


def read_backbone_meta(folder: str | os.PathLike) -> tuple[str, dict]:
    """(network name or class path, constructor arguments) recorded in a backbone folder's ``backbone.json`` (written
    by :func:`peft_tensor.training.models.save_backbone`: ``{"name": ..., "kwargs": {...}}``; a ``_target_`` entry
    takes precedence over ``name``)."""
    meta = json.loads((Path(folder) / BACKBONE_META).read_text(encoding="utf-8"))
    return meta.get("_target_") or meta["name"], dict(meta.get("kwargs") or {})


def load_backbone_folder(folder: str | os.PathLike, network: nn.Module | str | Mapping | None = None, /, *,
                         strict: bool = False, source: str | None = None,
                         trusted_module_roots: tuple[str, ...] | None = TRUSTED_MODULE_ROOTS,
                         trust_remote_code: bool = False, **overrides) -> tuple[nn.Module, LoadReport]:
    """A backbone folder (``backbone.json`` + ``model.safetensors``): its network, built from the recorded
    arguments with ``overrides`` unless ``network`` is given, loaded as :func:`load_state` does; and the report.
    ``backbone.json`` is read like any file: ``trusted_module_roots`` / ``trust_remote_code`` as in
    :func:`load_network`."""
    roots = None if trust_remote_code or remote_code_trusted() else trusted_module_roots
    net, report = _load_backbone(Path(folder), network, strict, source, roots, overrides)
    if report.partial:
        warnings.warn(report.partial_message(), PartialLoadWarning, stacklevel=2)
    return net, report


def _load_backbone(folder: Path, network, strict, source, roots, overrides) -> tuple[nn.Module, LoadReport]:
    weights = folder / BACKBONE_WEIGHTS
    net, notes = _network_arg(network, overrides, read_backbone_meta(folder), roots, str(folder))
    report = LoadReport(source=str(folder) if source is None else source, network=class_path_of(net),
                        weights=str(weights), layout=["backbone folder (backbone.json + model.safetensors)"],
                        notes=notes)
    return net, load_state(net, read_checkpoint(weights), strict=strict, report=report, warn=False)


def _load_bundle(folder, configs, source, network, strict, allow_pickle, roots, overrides):
    config = next((c for c in configs if c.name.startswith("inference")), configs[0])
    default = None
    if network is None:  # only network_def is read, not the whole config (never MONAI's ConfigParser: see below)
        default = split_spec(_resolve_refs(config, folder))
    weights = next((folder / "models" / w for w in BUNDLE_WEIGHTS if (folder / "models" / w).is_file()), None)
    if weights is None:
        ts = " (only models/model.ts, a TorchScript export, which is not read as weights)" if (
            folder / "models" / "model.ts").is_file() else ""
        raise NetworkLoadError(f"bundle {folder} has no models/model.safetensors or models/model.pt{ts}.")
    net, notes = _network_arg(network, overrides, default, roots, str(config), drop_unknown=True)
    report = LoadReport(source=source, network=class_path_of(net), weights=str(weights),
                        layout=[f"MONAI bundle ({config.relative_to(folder)})"], notes=notes)
    return net, load_state(net, read_checkpoint(weights, allow_pickle=allow_pickle), strict=strict, report=report,
                           warn=False)


def _resolve_refs(config: Path, folder: Path) -> dict:
    """``network_def`` of the bundle config ``config`` with its ``@id`` references and ``%`` macros (files inside
    the bundle ``folder`` only) expanded, with bounded work; Python expressions (``$...``) and nested components are
    refused: evaluating them runs code from the config file. MONAI's ``ConfigParser`` is not used: it expands the
    whole config without limits and reads macro files from anywhere (:mod:`peft_tensor.networks.bundle_config`)."""
    from .bundle_config import read_network_def

    return read_network_def(config, folder)


def _load_provenance(folder, source, network, strict, roots, overrides):
    from ..errors import AdapterLoadError
    from ..hub.provenance import local_weights, read_provenance, sha256_file

    record = read_provenance(folder) or {}
    if not record.get("base_network"):
        raise NetworkLoadError(f"{folder / PROVENANCE_FILE} records no base network.")
    spec = BaseNetwork.from_dict(record["base_network"])
    if spec.config is not None:
        raise NetworkLoadError(f"{folder}: the base network is a transformers model ({spec.cls}); load it with "
                               "peft_tensor.hub.load_pretrained.")
    if spec.weights is None:
        raise NetworkLoadError(
            f"{folder / PROVENANCE_FILE} records the base network {spec.describe()} but not its weights: a rebuilt "
            "network would be random. Load the weights file itself: load_network(<weights>, network=...).")
    ref = spec.weights
    if ref.repo_id:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        try:
            path = Path(hf_hub_download(ref.repo_id, ref.filename or "model.safetensors", revision=ref.revision))
        except (HfHubHTTPError, LocalEntryNotFoundError) as exc:
            raise NetworkLoadError(f"cannot fetch the base weights {ref.describe()}: {exc}") from None
    else:  # a path relative to the record's folder (inside the run folder), or an older record's absolute path
        try:
            path = local_weights(ref, folder)  # sha256-checked there
        except AdapterLoadError as exc:
            raise NetworkLoadError(str(exc)) from None
    digest = sha256_file(path) if ref.repo_id else ref.sha256
    if ref.sha256 and digest != ref.sha256:
        raise NetworkLoadError(
            f"base weights {path} have sha256 {digest[:12]}..., but {PROVENANCE_FILE} records {ref.sha256[:12]}...: "
            "not the weights the record describes. Load the file itself if you know it is right: "
            "load_network(<weights>, network=...).")
    net, notes = _network_arg(network, overrides, (spec.cls, spec.kwargs), roots, str(folder))
    report = LoadReport(source=source, network=class_path_of(net), weights=str(path),
                        layout=[f"{PROVENANCE_FILE} base network + weights (sha256 checked)"], notes=notes)
    return net, load_state(net, read_checkpoint(path), strict=strict, report=report, warn=False)


def _download_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = [PROVENANCE_FILE, "backbone.json", "model.safetensors", "configs/*", "models/model.pt",
                "models/model.safetensors"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise NetworkLoadError(f"{repo_id} is not in the local Hub cache and the Hub cannot be reached "
                               "(HF_HUB_OFFLINE=1 or no network). Download it once while online.") from None
    except HfHubHTTPError as exc:
        raise NetworkLoadError(f"{repo_id}: not a local path, and the Hub answered {str(exc).splitlines()[0]}. "
                               "Check the repo id (or the path, if you meant a local file).") from None


def default_bundle_dir() -> Path:
    """MONAI's bundle cache: ``<torch.hub.get_dir()>/bundle`` (``TORCH_HOME`` moves it)."""
    return Path(torch.hub.get_dir()) / "bundle"


def _bundle_from_cache(name: str, bundle_dir) -> Path:
    root = Path(bundle_dir) if bundle_dir else default_bundle_dir()
    folder = root / name
    if (folder / "configs").is_dir():
        return folder
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise NetworkLoadError(f"bundle {name!r} is not in the bundle cache {root} and HF_HUB_OFFLINE is set. "
                               f"Download it once while online (python -m monai.bundle download --name {name} "
                               f"--bundle_dir {root}) or give the bundle folder's path.")
    from monai.bundle import download

    try:
        download(name=name, bundle_dir=str(root), progress=False)
    except Exception as exc:  # noqa: BLE001 - network errors of several libraries
        raise NetworkLoadError(f"bundle {name!r} is not in the bundle cache {root}, and downloading it failed "
                               f"({type(exc).__name__}: {str(exc)[:200]}). Check the name, or give the bundle "
                               "folder's path.") from None
    if not (folder / "configs").is_dir():
        raise NetworkLoadError(f"monai.bundle.download({name!r}) left no {folder}/configs; give the bundle folder.")
    return folder
