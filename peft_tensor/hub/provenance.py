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

What a record (or a bundle config) says is data, never code. Its values pass through one decoder,
:func:`decode_value` (JSON values; the only tagged form is ``{"__torch_dtype__": NAME}`` for the dtypes in
:data:`TORCH_DTYPES`). A class named by a file is looked up in an allow-list (:func:`import_network_class`: MONAI's
``monai.networks.nets``, transformers ``PreTrainedModel`` classes, ``torch.nn``) without importing the module the
file names, and its constructor arguments are checked against its signature, refusing arguments that read files or
URLs (``pretrained_url``, ``cache_dir``, ...). ``trust_remote_code=True`` lifts the class and argument checks, never
the decoder's.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import hashlib
import importlib
import inspect
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

from .._atomic import atomic_write, atomic_write_json
from ..errors import AdapterLoadError, PeftTensorError
from ..version import __version__

PROVENANCE_FILE = "peft_tensor.json"
FORMAT_VERSION = 1
_SPEC_ATTR = "peft_tensor_base_network"
# Module roots whose nn.Module classes may be built from a downloaded record without opting in: only the classes of
# the allow-list (see import_network_class), resolved without importing the module a file names.
TRUSTED_MODULE_ROOTS = ("monai", "transformers", "torch", "peft_tensor")
# The dtypes a record may name ({"__torch_dtype__": NAME}); nothing else of torch is reachable from a file.
TORCH_DTYPES = tuple(name for name in (
    "float16", "float32", "float64", "bfloat16", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
    "uint64", "bool", "complex32", "complex64", "complex128",
) if isinstance(getattr(torch, name, None), torch.dtype))
_DTYPE_TAG = "__torch_dtype__"
# Constructor arguments that may read files or fetch URLs (pretrained_url, cache_dir, checkpoint_path, ...).
_IO_ARG = re.compile(r"^(pretrained|cache|download)|url|path|file|dir|checkpoint")
# ... except boolean gradient-checkpointing switches (SwinUNETR's use_checkpoint), which read nothing.
_NOT_IO_ARG = re.compile(r"use_\w*checkpoint\w*|\w*gradient_checkpointing")
TRUST_HINT = "pass trust_remote_code=True (CLI: --trust-remote-code) only if you trust the source"
_TRUST_REMOTE_CODE: contextvars.ContextVar[bool] = contextvars.ContextVar("peft_tensor_trust_remote_code",
                                                                           default=False)


class ProvenanceError(PeftTensorError):
    """The base network cannot be described or rebuilt from its provenance record."""


# ---------------------------------------------------------------------------------------------------------- records
@dataclass
class WeightsRef:
    """Where the base network's weights live: a Hub file (repo_id/revision/filename) or a local ``path``, with the
    file's ``sha256``. In a record, a local ``path`` is relative to the record's folder (POSIX separators) when the
    file lies in the run folder -- the record's folder, or for a recipe run its parent: ``../base/model.safetensors``
    beside ``<run>/adapter/`` -- so the run folder can move; absolute otherwise (see :meth:`for_record` and
    :func:`local_weights`). Records of older versions hold absolute paths, some without a hash."""

    sha256: str | None = None
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
        digest = f"sha256 {self.sha256[:12]}..." if self.sha256 else "no sha256 recorded"
        return f"{where} ({digest}, {_human_size(self.size)})"

    def for_record(self, record_dir: str | os.PathLike, run_dir: str | os.PathLike | None = None) -> "WeightsRef":
        """This reference as written into a record in ``record_dir``: a local file inside ``run_dir`` -- the record
        folder itself (default) or its parent (a recipe run: ``<run>/adapter/`` and ``<run>/base/``) -- as a path
        relative to ``record_dir``, anything else unchanged."""
        if self.repo_id or not self.path or not os.path.isabs(self.path):
            return copy.copy(self)
        here = os.path.realpath(record_dir)
        run = os.path.realpath(run_dir) if run_dir is not None else here
        if run not in (here, os.path.dirname(here)):
            run = here  # a reader looks no further than the record folder's parent
        real = os.path.realpath(self.path)
        if os.path.commonpath([run, real]) != run:
            return copy.copy(self)
        rel = Path(os.path.relpath(real, os.path.realpath(record_dir))).as_posix()
        return WeightsRef(**{**asdict(self), "path": rel})

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

    def build(self, trusted_module_roots: tuple[str, ...] | None = TRUSTED_MODULE_ROOTS, device=None, *,
              trust_remote_code: bool = False, trusted_args: Iterable[str] = ()) -> nn.Module:
        """Construct the network (random weights) and attach this record to it.

        ``trusted_module_roots=None`` means the record comes from code (any class, any argument); otherwise it came
        from a file: the class must be on the allow-list and no argument may read files or URLs (see
        :func:`import_network_class` and :func:`check_network_args`) unless ``trust_remote_code``. ``trusted_args``:
        argument names the caller supplied in code (exempt from the file/URL check). Values are always decoded by
        :func:`decode_value`.
        """
        klass = import_network_class(self.cls, trusted_module_roots, trust_remote_code=trust_remote_code)
        if self.config is not None:
            config = decode_value(self.config, f"{self.cls} config")
        else:
            kwargs = decode_value(self.kwargs, f"{self.cls} kwargs")
            if trusted_module_roots is not None:
                check_network_args(klass, kwargs, self.cls, trust_remote_code=trust_remote_code,
                                   trusted_args=trusted_args)
        with torch.device(device) if device is not None else _nullcontext():
            if self.config is not None:
                config_cls = getattr(klass, "config_class", None)
                if config_cls is None:
                    raise ProvenanceError(f"{self.cls} has no config_class; cannot rebuild it from a config dict.")
                net = klass(config_cls.from_dict(config))
            else:
                net = klass(**kwargs)
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


def import_network_class(class_path: str, trusted_module_roots: tuple[str, ...] | None = TRUSTED_MODULE_ROOTS, *,
                         trust_remote_code: bool = False):
    """The ``nn.Module`` class named ``class_path`` (never any other callable).

    ``trusted_module_roots=None`` (or ``trust_remote_code=True``): the path comes from code, or from a source the
    caller trusts, and is imported. Otherwise it comes from a file and must name a class of the allow-list --
    MONAI networks (``monai.networks.nets.X`` or their defining path ``monai.networks.nets.x.X``), transformers
    ``PreTrainedModel`` classes (``transformers.X``) and ``torch.nn`` modules -- found by importing only
    ``monai.networks.nets`` / ``transformers`` / ``torch.nn`` and looking the name up there: the module the file
    names is never imported. Packages outside :data:`TRUSTED_MODULE_ROOTS` that the caller lists in
    ``trusted_module_roots`` (in code) are imported after the root check.
    """
    if not isinstance(class_path, str):
        raise ProvenanceError(f"Base network class must be an import path string, got {class_path!r}.")
    module_name, _, attr = class_path.rpartition(".")
    if not module_name or not attr:
        raise ProvenanceError(
            f"Base network class {class_path!r} is not an import path like 'monai.networks.nets.UNETR'.")
    root = module_name.split(".")[0]
    if trusted_module_roots is None or trust_remote_code:
        klass = _import_attr(class_path, module_name, attr)
    elif root not in trusted_module_roots:
        raise ProvenanceError(
            f"The provenance record asks to build {class_path}, outside the trusted packages "
            f"{', '.join(trusted_module_roots)}; it was not imported. If you trust this adapter's author, pass "
            f"trusted_module_roots=(..., '{root}') or {TRUST_HINT}; or build the network yourself and pass "
            "base_model= (load_network: network=)."
        )
    elif root in TRUSTED_MODULE_ROOTS:
        klass = _allow_listed_class(class_path, module_name, attr)
    else:  # a package the caller named in code
        klass = _import_attr(class_path, module_name, attr)
    if not (isinstance(klass, type) and issubclass(klass, nn.Module)):
        raise ProvenanceError(f"{class_path} is not a torch.nn.Module class; refusing to call it.")
    return klass


def _import_attr(class_path: str, module_name: str, attr: str):
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ProvenanceError(
            f"Cannot import the base network class {class_path} ({exc}). Install the package that provides it."
        ) from exc


def _allow_listed_class(class_path: str, module_name: str, attr: str):
    """``class_path`` looked up in the allow-listed namespaces only; nothing the path names is imported."""
    root = module_name.split(".")[0]
    found, namespace, base = None, None, nn.Module
    try:
        if root == "monai":
            import monai.networks.nets as nets

            namespace, found = "monai.networks.nets", getattr(nets, attr, None)
        elif root == "transformers":
            import transformers

            namespace, base = "transformers", transformers.PreTrainedModel
            found = getattr(transformers, attr, None) if not attr.startswith("_") else None
        elif root == "torch" and module_name == "torch":
            namespace, found = "torch", getattr(torch, attr, None)
        elif root == "torch":
            namespace, found = "torch.nn", getattr(nn, attr, None)
    except (ImportError, RuntimeError) as exc:  # transformers' lazy imports raise RuntimeError
        raise ProvenanceError(
            f"Cannot look up the base network class {class_path} ({exc}). Install the package that provides it."
        ) from exc
    if found is not None and module_name != namespace and not (
            isinstance(found, type) and found.__module__ == module_name and found.__qualname__ == attr):
        found = None  # e.g. monai.networks.blocks.UNETR: not where UNETR is defined
    if found is not None and module_name == "torch":
        return found  # the caller says: not an nn.Module class
    if not (isinstance(found, type) and issubclass(found, base)):
        raise ProvenanceError(
            f"{class_path} is not among the network classes a downloaded file may name (MONAI networks in "
            "monai.networks.nets, transformers PreTrainedModel classes, torch.nn modules); it was not imported. "
            f"Name the class as monai.networks.nets.<Name>, build the network yourself and pass base_model= "
            f"(load_network: network=), or {TRUST_HINT}."
        )
    return found


def check_network_args(klass: type, kwargs: Mapping, class_path: str, *, trust_remote_code: bool = False,
                       trusted_args: Iterable[str] = ()) -> None:
    """Constructor arguments read from a file, checked against ``klass``'s signature before it is called.

    An argument the class does not take (unless it takes ``**kwargs``) is refused, naming the accepted ones.
    Arguments that may read files or fetch URLs -- names like ``pretrained*``, ``*url*``, ``*path*``, ``*file*``,
    ``*dir*``, ``*checkpoint*``, ``cache*``, ``download*`` with a value other than None / False -- are refused
    unless ``trust_remote_code``. ``trusted_args``: names the caller supplied in code.
    """
    try:
        params = inspect.signature(klass.__init__).parameters
    except (TypeError, ValueError):
        params = None
    if params is not None and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        accepted = [n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL,)]
        unknown = [k for k in kwargs if k not in accepted]
        if unknown:
            raise ProvenanceError(
                f"{class_path} takes no argument {', '.join(map(repr, unknown))}; it accepts "
                f"{', '.join(accepted)}. Fix the config, or build the network yourself and pass it.")
    if trust_remote_code:
        return
    trusted = set(trusted_args)
    refused = [k for k, v in kwargs.items() if k not in trusted and v is not None and v is not False
               and _IO_ARG.search(str(k).lower())
               and not (isinstance(v, bool) and _NOT_IO_ARG.fullmatch(str(k).lower()))]
    if refused:
        shown = ", ".join(f"{k}={kwargs[k]!r}" for k in refused)
        raise ProvenanceError(
            f"Refusing to build {class_path}({shown}): the config read from a file sets constructor arguments that "
            f"may read files or fetch URLs. Set them to null, build the network yourself, or {TRUST_HINT}.")


def remote_code_trusted() -> bool:
    """Whether a :func:`trusting_remote_code` block is active (the CLI's ``run --trust-remote-code``)."""
    return _TRUST_REMOTE_CODE.get()


@contextlib.contextmanager
def trusting_remote_code(trust: bool = True) -> Iterator[None]:
    """Within the block, the loaders (``load_network``, ``load_pretrained``) act as if given
    ``trust_remote_code=True``: for code the caller runs on a source it trusts (e.g. a recipe)."""
    token = _TRUST_REMOTE_CODE.set(bool(trust))
    try:
        yield
    finally:
        _TRUST_REMOTE_CODE.reset(token)


# ---------------------------------------------------------------------------------------------------------- weights
class WeightsNotFoundError(AdapterLoadError):
    """The local base weights a record names are not where it says (nor in the run folder under the same name)."""


class WeightsHashError(AdapterLoadError):
    """The file at the recorded base-weights path is not the file the record describes (its sha256 differs)."""


def local_weights(ref: WeightsRef, record_dir: str | os.PathLike, check_hash: bool = True) -> Path:
    """The local file of ``ref`` (a ``path`` reference) read from the record in ``record_dir``, sha256-checked
    unless ``check_hash`` is false (then only the recorded path itself is looked at).

    - A relative path (written by :meth:`WeightsRef.for_record`) resolves against ``record_dir`` and must stay in
      the run folder (``record_dir``'s parent), symbolic links followed: a record cannot point a reader anywhere
      else. So a moved or copied run folder loads as it is.
    - An absolute path (records of older versions) is read where it is; where that file is gone, the file of the
      same name in the same folder name inside the run folder (``<run>/base/model.safetensors``) is taken, only
      if the record has its sha256 and it matches.

    Raises :class:`WeightsNotFoundError` (no such file) or :class:`WeightsHashError` (the file there is another
    one), both :class:`~peft_tensor.errors.AdapterLoadError`, saying what to do.
    """
    record_dir = Path(record_dir)
    run = Path(os.path.realpath(record_dir.parent))
    recorded = str(ref.path or "")
    if not recorded:
        raise WeightsNotFoundError(f"{record_dir / PROVENANCE_FILE} records no base weights file.")
    where = f"the base weights {recorded!r} recorded in {record_dir / PROVENANCE_FILE}"
    if not os.path.isabs(recorded):
        path = Path(os.path.realpath(record_dir / recorded))
        if os.path.commonpath([run, path]) != str(run):
            raise WeightsNotFoundError(
                f"{where} lie outside the run folder {run}; a record may name a relative path only inside its run "
                "folder. Pass the network with its weights yourself (base_model= / load_network(<weights>, "
                "network=...)).")
        candidates = [path]
    else:
        old = Path(recorded)
        candidates = [old]
        if not old.is_file() and ref.sha256 and check_hash:  # the run folder moved: the same file name inside it
            moved = [run / old.parent.name / old.name, Path(os.path.realpath(record_dir)) / old.name]
            candidates += [c for c in moved if os.path.commonpath([run, os.path.realpath(c)]) == str(run)]
    for candidate in candidates:
        if not candidate.is_file():
            continue
        if ref.sha256 is None or not check_hash:  # an old record without a hash: the file is taken as it is
            return candidate
        digest = sha256_file(candidate)
        if digest == ref.sha256:
            return candidate
        if candidate == candidates[0]:
            raise WeightsHashError(
                f"{where} are not the weights the adapter was trained on: {candidate} has sha256 {digest[:12]}..., "
                f"the record says {ref.sha256[:12]}... (the file was replaced or the run folder mixed up). Put the "
                "original file back, or pass the network with the weights you mean (base_model= / "
                "load_network(<weights>, network=...)); load_pretrained(check_base_hash=False) only if you know "
                "they are equivalent.")
    raise WeightsNotFoundError(
        f"{where} are not on this machine{' (nor in the run folder ' + str(run) + ')' if len(candidates) > 1 else ''}."
        " Copy the run folder with its base weights, pass the network with its weights (base_model= / "
        "load_network(<weights>, network=...)), or publish them with `peft-tensor push --base-weights-repo`.")


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
    from .._peft_compat import BaseTunerLayer
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


def decode_value(value: Any, where: str = "value") -> Any:
    """The one decoder of values read from files (records, bundle configs, backbone.json): JSON values (dicts with
    string keys, lists, strings, numbers, booleans, null) and the tagged form ``{"__torch_dtype__": NAME}`` for the
    dtypes of :data:`TORCH_DTYPES`. Anything else -- another ``__tag__``, a name that is not a dtype (``load``,
    ``save``), a non-JSON object -- raises :class:`ProvenanceError` naming the key. Tuples decode as tuples and
    ``torch.dtype`` values pass (code-supplied values)."""
    if isinstance(value, Mapping):
        tags = [k for k in value if isinstance(k, str) and re.fullmatch(r"__\w+__", k)]
        if _DTYPE_TAG in tags:
            name = value[_DTYPE_TAG]
            if len(value) != 1:
                raise ProvenanceError(f"{where}: {{'{_DTYPE_TAG}': ...}} must be the only key of its mapping, found "
                                      f"{sorted(map(str, value))}.")
            if not (isinstance(name, str) and name in TORCH_DTYPES):
                raise ProvenanceError(
                    f"{where}.{_DTYPE_TAG} = {name!r} is not a torch dtype; a config may name only the dtypes "
                    f"{', '.join(TORCH_DTYPES)} there, never other torch attributes. Refusing to decode it.")
            return getattr(torch, name)
        if tags:
            raise ProvenanceError(f"{where}.{tags[0]}: unknown tagged value; a config may use only "
                                  f"{{'{_DTYPE_TAG}': NAME}}. Refusing to decode it.")
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ProvenanceError(f"{where}: key {k!r} is not a string; only JSON values can be decoded.")
            out[k] = decode_value(v, f"{where}.{k}")
        return out
    if isinstance(value, list):
        return [decode_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return tuple(decode_value(v, f"{where}[{i}]") for i, v in enumerate(value))
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return value
    raise ProvenanceError(f"{where} = {value!r} ({type(value).__name__}) is not a JSON value; refusing to decode it.")


_from_json = decode_value  # the former private name


def _human_size(n: int | None) -> str:
    if n is None:
        return "size unknown"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover
