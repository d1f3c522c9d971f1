"""Which base network an adapter belongs to: import path, constructor arguments, weights reference.

MONAI networks carry no config, so an adapter file alone cannot say what it adapts. The provenance record
(``peft_tensor.json``, written beside ``adapter_config.json``) holds:

- ``base_network.class``: import path of the network class, e.g. ``"monai.networks.nets.UNETR"``;
- ``base_network.kwargs``: its constructor arguments (MONAI), or ``base_network.config``: a transformers config dict;
- ``base_network.weights``: optional reference to the base weights -- a Hub file (``repo_id``, ``revision``,
  ``filename``) or a local ``path`` -- with the file's ``sha256``;
- ``base_network.source``: optional, where the user's pretrained weights came from (a MONAI bundle name, a Hub repo
  id, a checkpoint path) -- informative only, the weights reference above is what loading uses;
- ``adapters.<name>``: per adapter, its ``peft_type``, parameter counts and the shapes of every base module it
  touches (``module_shapes``), so a wrong base network is refused before it is modified;
- ``card``: what the model card says about training data and evaluation results.

Constructor arguments are captured by building the network through :func:`build_network` or by declaring them on an
existing network with :func:`record_network`, which checks them by rebuilding the network on the ``meta`` device.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .._atomic import atomic_write, atomic_write_json
from ..errors import AdapterLoadError, PeftTensorError
from ..version import __version__

PROVENANCE_FILE = "peft_tensor.json"
FORMAT_VERSION = 1
_SPEC_ATTR = "peft_tensor_base_network"
# Module roots whose nn.Module classes may be built from a downloaded record without opting in.
TRUSTED_MODULE_ROOTS = ("monai", "transformers", "torch", "peft_tensor")


class ProvenanceError(PeftTensorError):
    """The base network cannot be described or rebuilt from its provenance record."""


# ---------------------------------------------------------------------------------------------------------- records
@dataclass
class WeightsRef:
    """Where the base network's weights live: a Hub file (repo_id/revision/filename) or a local ``path``."""

    sha256: str
    size: int | None = None
    repo_id: str | None = None
    revision: str | None = None
    filename: str | None = None
    path: str | None = None

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "WeightsRef":
        path = Path(path)
        return cls(sha256=sha256_file(path), size=path.stat().st_size, path=str(path.resolve()))

    def describe(self) -> str:
        where = (f"{self.repo_id}@{(self.revision or 'main')[:12]}:{self.filename}" if self.repo_id
                 else str(self.path))
        return f"{where} (sha256 {self.sha256[:12]}..., {_human_size(self.size)})"

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class BaseNetwork:
    """A base network as import path + constructor arguments (or transformers config) + optional weights."""

    cls: str
    kwargs: dict = field(default_factory=dict)
    config: dict | None = None
    weights: WeightsRef | None = None
    source: str | None = None

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"class": self.cls}
        if self.config is not None:
            out["config"] = self.config
        else:
            out["kwargs"] = self.kwargs
        if self.weights is not None:
            out["weights"] = self.weights.to_dict()
        if self.source:
            out["source"] = self.source
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> "BaseNetwork":
        if not isinstance(data, Mapping) or not isinstance(data.get("class"), str):
            raise ProvenanceError(f"{PROVENANCE_FILE}: 'base_network' needs a 'class' import path, got {data!r}.")
        weights = data.get("weights")
        known = {f.name for f in WeightsRef.__dataclass_fields__.values()}
        return cls(
            cls=data["class"], kwargs=dict(data.get("kwargs") or {}), config=data.get("config"),
            weights=WeightsRef(**{k: v for k, v in weights.items() if k in known}) if weights else None,
            source=data.get("source"),
        )

    def describe(self) -> str:
        if self.config is not None:
            keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads")
            args = ", ".join(f"{k}={self.config[k]!r}" for k in keys if k in self.config)
        else:
            args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{self.cls}({args})"

    def build(self, trusted_module_roots: tuple[str, ...] | None = TRUSTED_MODULE_ROOTS, device=None) -> nn.Module:
        """Construct the network (random weights) and attach this record to it."""
        klass = import_network_class(self.cls, trusted_module_roots)
        with torch.device(device) if device is not None else _nullcontext():
            if self.config is not None:
                config_cls = getattr(klass, "config_class", None)
                if config_cls is None:
                    raise ProvenanceError(f"{self.cls} has no config_class; cannot rebuild it from a config dict.")
                net = klass(config_cls.from_dict(self.config))
            else:
                net = klass(**_from_json(self.kwargs))
        if device != "meta":
            setattr(net, _SPEC_ATTR, BaseNetwork(self.cls, copy.deepcopy(self.kwargs), copy.deepcopy(self.config)))
        return net


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------------------------------------- capture
def build_network(class_path: str, /, **kwargs) -> nn.Module:
    """Build ``class_path(**kwargs)`` and remember both, so a saved adapter records its base network.

    Example: ``build_network("monai.networks.nets.UNETR", in_channels=1, out_channels=2, img_size=96)``.
    Constructor arguments must be JSON-serialisable (tuples are stored as lists).
    """
    spec = BaseNetwork(class_path, _to_json(kwargs, class_path))
    return spec.build(trusted_module_roots=None)


def record_network(network: nn.Module, /, class_path: str | None = None, *, verify: bool = True,
                   **kwargs) -> nn.Module:
    """Declare the constructor arguments of an already built ``network`` (returned, annotated in place).

    ``class_path`` defaults to the network's own class. With ``verify`` the network is rebuilt on the ``meta``
    device from these arguments and its parameter names and shapes must match, which catches forgotten arguments.
    """
    class_path = class_path or f"{type(network).__module__}.{type(network).__qualname__}"
    spec = BaseNetwork(class_path, _to_json(kwargs, class_path))
    if verify:
        skeleton = spec.build(trusted_module_roots=None, device="meta")
        want = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
        have = {k: tuple(v.shape) for k, v in network.state_dict().items()}
        if want != have:
            diff = sorted(set(want.items()) ^ set(have.items()))[:4]
            raise ProvenanceError(
                f"record_network: {class_path}(**kwargs) builds a network whose parameters differ from the given "
                f"network (first differences: {diff}). Pass the exact constructor arguments the network was built "
                "with, or build it with peft_tensor.hub.build_network."
            )
    setattr(network, _SPEC_ATTR, spec)
    return network


def describe_network(model: nn.Module) -> BaseNetwork:
    """The :class:`BaseNetwork` record of ``model`` (a PeftModel or a plain network)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    spec = getattr(base, _SPEC_ATTR, None)
    if spec is not None:
        return BaseNetwork(spec.cls, copy.deepcopy(spec.kwargs), copy.deepcopy(spec.config))
    config = getattr(base, "config", None)
    if config is not None and hasattr(config, "to_dict") and type(base).__module__.startswith("transformers"):
        return BaseNetwork(f"transformers.{type(base).__name__}", config=_to_json(config.to_dict(), "config"))
    raise ProvenanceError(
        f"Cannot tell which base network this adapter belongs to: {type(base).__name__} carries no constructor "
        "arguments (MONAI networks have no config). Build the network with "
        "peft_tensor.hub.build_network('monai.networks.nets.UNETR', **kwargs), or declare them with "
        "peft_tensor.hub.record_network(net, **kwargs), or pass base_network=BaseNetwork(...)."
    )


def import_network_class(class_path: str, trusted_module_roots: tuple[str, ...] | None = TRUSTED_MODULE_ROOTS):
    """Import ``class_path`` and check it is an ``nn.Module`` class (never call arbitrary callables)."""
    module_name, _, attr = class_path.rpartition(".")
    if not module_name:
        raise ProvenanceError(
            f"Base network class {class_path!r} is not an import path like 'monai.networks.nets.UNETR'.")
    if trusted_module_roots is not None and module_name.split(".")[0] not in trusted_module_roots:
        raise ProvenanceError(
            f"The provenance record asks to build {class_path}, outside the trusted packages "
            f"{', '.join(trusted_module_roots)}. If you trust this adapter's author, pass "
            f"trusted_module_roots=(..., '{module_name.split('.')[0]}') or build the network yourself and pass "
            "base_model=."
        )
    try:
        klass = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ProvenanceError(
            f"Cannot import the base network class {class_path} ({exc}). Install the package that provides it."
        ) from exc
    if not (isinstance(klass, type) and issubclass(klass, nn.Module)):
        raise ProvenanceError(f"{class_path} is not a torch.nn.Module class; refusing to call it.")
    return klass


# ---------------------------------------------------------------------------------------------------------- weights
def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def save_base_weights(network: nn.Module, path: str | os.PathLike) -> WeightsRef:
    """Write the base network's weights to a safetensors file (atomically) and return its reference.

    Call this on the plain network, before ``get_peft_model`` wraps its layers.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors.torch import save_file

    if hasattr(network, "get_base_model") or any(isinstance(m, BaseTunerLayer) for m in network.modules()):
        raise ProvenanceError(
            "save_base_weights needs the plain base network, but this one already holds adapter layers. Save the "
            "base weights before get_peft_model (or from a freshly built network)."
        )
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in network.state_dict().items()}
    path = Path(path)
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt", "peft_tensor": __version__}))
    return WeightsRef.from_file(path)


# ---------------------------------------------------------------------------------------------------------- files
def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON through a temporary file in the same directory and ``os.replace`` (never a half-written file)."""
    atomic_write_json(path, data)


def read_provenance(directory: str | os.PathLike, subfolder: str | None = None) -> dict | None:
    """The provenance record for an adapter directory (``subfolder`` first, then the root); None if absent."""
    candidates = [Path(directory) / subfolder / PROVENANCE_FILE] if subfolder else []
    candidates.append(Path(directory) / PROVENANCE_FILE)
    for path in candidates:
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise AdapterLoadError(f"{path} is not valid JSON ({exc}); re-save the adapter.") from exc
            if not isinstance(data, dict) or data.get("format_version", 0) > FORMAT_VERSION:
                raise AdapterLoadError(
                    f"{path} uses provenance format {data.get('format_version') if isinstance(data, dict) else '?'}, "
                    f"newer than this peft_tensor ({__version__}) reads. Upgrade: pip install -U peft-tensor."
                )
            return data
    return None


def library_versions() -> dict[str, str]:
    import peft

    versions = {"peft_tensor": __version__, "peft": peft.__version__, "torch": torch.__version__.split("+")[0]}
    for name in ("monai", "transformers"):
        try:
            versions[name] = importlib.import_module(name).__version__
        except Exception:  # noqa: BLE001 - optional libraries
            pass
    return versions


# ---------------------------------------------------------------------------------------------------------- helpers
def _to_json(value: Any, where: str) -> Any:
    """Constructor arguments as JSON values (tuples -> lists); anything else is refused with its name."""
    if isinstance(value, Mapping):
        return {str(k): _to_json(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v, where) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return {"__torch_dtype__": str(value).removeprefix("torch.")}
    raise ProvenanceError(
        f"Constructor argument {where} = {value!r} ({type(value).__name__}) cannot be stored in {PROVENANCE_FILE}; "
        "use JSON values (numbers, strings, lists, dicts) or build the network yourself and pass base_model= when "
        "loading."
    )


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__torch_dtype__"}:
            return getattr(torch, value["__torch_dtype__"])
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def _human_size(n: int | None) -> str:
    if n is None:
        return "size unknown"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover
