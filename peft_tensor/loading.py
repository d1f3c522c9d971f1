"""Checked loading of adapters: clear errors *before* the base model is touched.

``PeftModel.from_pretrained`` works on our adapters once ``peft_tensor`` is imported, but a bad adapter directory
surfaces as a ``KeyError`` or a deep ``load_state_dict`` size-mismatch trace, after the base model has already
been modified in place. :func:`from_pretrained` validates first:

* ``adapter_config.json`` exists, is JSON, has a known ``peft_type``, and was not written by a newer peft_tensor;
* ``adapter_model.safetensors`` is a complete safetensors file (header parses, data covers the file exactly);
* for peft_tensor methods, the group tensors planned on *this* base model have the saved shapes (same network,
  same number of layers);

and if the load still fails, for whatever reason (``KeyboardInterrupt`` included), the model is put back exactly as
it was -- the same module objects in the same places, parameter values, ``requires_grad`` flags, hooks and
attributes (:func:`restoring`) -- before the error is re-raised as an :class:`AdapterLoadError` (an interrupt or
``SystemExit`` is re-raised unchanged). Only safetensors are read here; pickled ``.bin`` adapters are refused.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Iterator, Optional

from torch import nn

from .errors import AdapterLoadError

__all__ = ["from_pretrained", "load_adapter_checked", "read_adapter_config", "read_config_file", "check_peft_type",
           "read_safetensors_header", "supported_peft_types",
           "check_adapter_compatible", "restore_base_model", "restoring"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


# peft_type -> distribution that provides it, for adapters whose method the running PEFT does not know: filled by
# each method's register(...) call (peft_tensor.registry).
from .registry import KNOWN_PROVIDERS  # noqa: E402


# PEFT's own method that peft_tensor loads too (the recipes' LoRA baselines, PEFT-native adapters on the Hub)
PLAIN_PEFT_TYPES = ("LORA",)


def supported_peft_types() -> list[str]:
    """The ``peft_type`` values peft_tensor loads: its registered methods (and any added to ``KNOWN_PROVIDERS`` by
    hand), then plain LoRA."""
    return list(KNOWN_PROVIDERS) + [t for t in PLAIN_PEFT_TYPES if t not in KNOWN_PROVIDERS]


def _supported_hint() -> str:
    names = supported_peft_types()
    listed = ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else "".join(names)
    return (f"peft_tensor loads {listed} adapters; an adapter of another PEFT method loads with plain PEFT instead "
            "(PeftModel.from_pretrained(model, path), without peft_tensor's checks), if you trust its source.")


def _bad_peft_type(peft_type: Any, where: str = "") -> AdapterLoadError:
    return AdapterLoadError(
        f"{where}adapter_config.json: peft_type must be a string naming the method, found "
        f"{type(peft_type).__name__} {peft_type!r}. {_supported_hint()}"
    )


def read_config_file(adapter_dir: str | os.PathLike) -> dict:
    """Read ``adapter_config.json``: it must exist, be a JSON object, name its ``peft_type`` (a string) and hold
    well-typed ``rank_pattern`` / ``alpha_pattern`` maps if any."""
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise AdapterLoadError(
            f"No {CONFIG_NAME} in {adapter_dir}: is this an adapter directory (save_pretrained output)?")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise AdapterLoadError(
            f"{path} is not valid JSON ({exc}); the file is corrupted, re-save the adapter.") from exc
    if not isinstance(cfg, dict):
        raise AdapterLoadError(f"{path} must hold a JSON object, found {type(cfg).__name__}.")
    if not cfg.get("peft_type"):
        raise AdapterLoadError(
            f"{path} has no 'peft_type', so PEFT cannot tell which method wrote it. Add the method name, e.g. "
            '"peft_type": "TCURLORA" (peft_tensor provides TCURLORA, LORAPT, HYPS).'
        )
    if not isinstance(cfg["peft_type"], str):
        raise _bad_peft_type(cfg["peft_type"], f"{path.parent}: ")
    _check_patterns(cfg, path)
    return cfg


def _check_patterns(cfg: dict, path: Path) -> None:
    """``rank_pattern``: module name -> positive int; ``alpha_pattern``: module name -> finite number (PEFT would
    fail on anything else with a TypeError halfway through wrapping the model)."""
    checks = {"rank_pattern": ("a positive integer rank", lambda v: type(v) is int and v > 0),
              "alpha_pattern": ("a finite number", lambda v: type(v) in (int, float) and math.isfinite(v))}
    for key, (what, ok) in checks.items():
        value = cfg.get(key)
        if value is None:
            continue
        fix = "The file is damaged or was edited by hand: fix the entry or re-save the adapter."
        if not isinstance(value, dict):
            raise AdapterLoadError(
                f"{path}: {key} must be an object mapping module names to {what}, found {type(value).__name__} "
                f"{value!r:.80}. {fix}")
        for name, v in value.items():
            if not ok(v):
                raise AdapterLoadError(
                    f"{path}: {key}[{name!r}] must be {what}, found {type(v).__name__} {v!r:.80}. {fix}")


def check_peft_type(config: dict, provenance: Optional[dict] = None, where: str = "") -> None:
    """Refuse a peft_type peft_tensor does not load, naming the ones it does and the package that provides it."""
    import peft

    from ._peft_compat import PEFT_TYPE_TO_CONFIG_MAPPING
    from .version import __version__

    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or not peft_type:
        raise _bad_peft_type(peft_type, where)
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
        if peft_type in supported_peft_types():
            return
        raise AdapterLoadError(
            f"{where}adapter_config.json has peft_type {peft_type!r}, a PEFT method that peft_tensor does not load "
            f"(its checks and the MONAI networks it adapts are made for its own methods). {_supported_hint()}"
        )
    provider = KNOWN_PROVIDERS.get(peft_type)
    if provider == "peft-tensor":
        written = (provenance or {}).get("written_by", {})
        version = config.get("peft_tensor_version") or written.get("peft_tensor")
        need = f"peft-tensor>={version}" if version else "peft-tensor"
        raise AdapterLoadError(
            f"{where}adapter_config.json has peft_type {peft_type!r}, a method of {need} (this adapter was written by "
            f"peft-tensor {version or '?'}); the running peft_tensor {__version__} did not register it with PEFT. "
            f"`import peft_tensor` before loading, or `pip install -U '{need}'`."
        )
    hint = f"It is provided by the '{provider}' package: pip install {provider}" if provider else (
        "Install the package that provides this method (see the adapter's model card) and import it first")
    raise AdapterLoadError(
        f"{where}adapter_config.json has peft_type {peft_type!r}, which the installed peft {peft.__version__} does "
        f"not know. {hint}. {_supported_hint()}"
    )


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict:
    """Read and sanity-check ``adapter_config.json`` (present, JSON, a peft_type peft_tensor loads, well-typed
    patterns)."""
    cfg = read_config_file(adapter_dir)
    check_peft_type(cfg, where=f"{adapter_dir}: ")
    return cfg


def read_safetensors_header(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Parse a safetensors header without loading tensors; verify the file is complete. Returns name -> info."""
    path = Path(path)
    if not path.is_file():
        raise AdapterLoadError(f"Missing {path.name} in {path.parent}. peft_tensor loads safetensors adapters only.")
    size = path.stat().st_size
    hint = "The file is corrupted or was cut off while being written or downloaded; save or download it again."
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise AdapterLoadError(f"{path} is too short to be a safetensors file ({size} bytes). {hint}")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100_000_000:
            raise AdapterLoadError(f"{path}: header length {n} exceeds the file size {size}. {hint}")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AdapterLoadError(f"{path}: the safetensors header is not valid JSON. {hint}") from exc
    # the structure safetensors itself requires, checked here so that a damaged header is this typed error and not
    # a TypeError / KeyError (or silence) in whoever reads the header next
    def malformed(why: str) -> AdapterLoadError:
        return AdapterLoadError(f"{path}: malformed safetensors header ({why}). {hint}")

    if not isinstance(header, dict):
        raise malformed(f"a JSON {type(header).__name__}, not an object")
    if not isinstance(header.pop("__metadata__", {}), dict):
        raise malformed("__metadata__ is not an object")
    itemsize = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise malformed(f"entry {name!r} is a JSON {type(info).__name__}, not an object")
        offsets, shape, dtype = info.get("data_offsets"), info.get("shape"), info.get("dtype")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise malformed(f"tensor {name!r} has data_offsets {offsets!r}, not [begin, end] with 0 <= begin <= end")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise malformed(f"tensor {name!r} has shape {shape!r}, not a list of sizes")
        if not isinstance(dtype, str):
            raise malformed(f"tensor {name!r} has dtype {dtype!r}")
        numel = 1
        for d in shape:
            numel *= d
        if dtype in itemsize and numel * itemsize[dtype] != offsets[1] - offsets[0]:
            raise malformed(f"tensor {name!r} is {dtype} {shape} but spans {offsets[1] - offsets[0]} bytes")
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            where = "overlaps the tensor before it" if begin < end else f"leaves bytes {end}..{begin} unused"
            raise malformed(f"tensor {name!r} starts at byte {begin}: it {where}")
        end = stop
    if 8 + n + end != size:
        raise AdapterLoadError(f"{path}: header describes {8 + n + end} bytes but the file has {size}. {hint}")
    return header


def check_adapter_compatible(base_model: nn.Module, adapter_dir: str | os.PathLike, config=None) -> None:
    """For peft_tensor tensor-group methods: raise unless the saved group tensors fit ``base_model``."""
    from peft.config import PeftConfig

    from ._peft_compat import PEFT_TYPE_TO_TUNER_MAPPING
    from .tuners.tensor_group import TensorGroupTuner

    if config is None:
        config = PeftConfig.from_pretrained(str(adapter_dir))
    tuner_cls = PEFT_TYPE_TO_TUNER_MAPPING.get(config.peft_type)
    header = read_safetensors_header(Path(adapter_dir) / WEIGHTS_NAME)
    if not (isinstance(tuner_cls, type) and issubclass(tuner_cls, TensorGroupTuner)):
        return
    try:
        specs = tuner_cls.plan(base_model, config)
    except ValueError as exc:
        raise AdapterLoadError(f"The adapter in {adapter_dir} does not fit this base model: {exc}") from exc
    prefix = f"base_model.{tuner_cls.groups_attr}."
    saved_groups = {k[len(prefix):].split(".", 1)[0] for k in header if k.startswith(prefix)}
    if len(saved_groups) != len(specs):
        raise AdapterLoadError(
            f"The adapter in {adapter_dir} has {len(saved_groups)} group tensors, but its config on this "
            f"{type(base_model).__name__} gives {len(specs)} ({', '.join(s.name for s in specs)}). It was trained on "
            "another network: load it onto the base model it was trained on."
        )
    from safetensors import safe_open

    for i, spec in enumerate(specs):
        key = f"{prefix}{i}.group_shape"
        if key in header:
            with safe_open(str(Path(adapter_dir) / WEIGHTS_NAME), framework="pt") as fh:
                saved_shape = fh.get_tensor(key).tolist()
            if saved_shape != [spec.n_slices, spec.n1, spec.n2]:
                raise AdapterLoadError(
                    f"The adapter in {adapter_dir} does not fit this base model: group {spec.name!r} was a "
                    f"{' x '.join(map(str, saved_shape))} tensor when trained, this model gives "
                    f"{spec.n_slices} x {spec.n1} x {spec.n2} (a different layer width or number of layers). Load it "
                    "onto the base network it was trained on."
                )
        for name, shape in tuner_cls.group_cls.expected_shapes(spec, config).items():
            key = f"{prefix}{i}.{name}"
            if key not in header:
                raise AdapterLoadError(
                    f"{adapter_dir}: tensor {key} is missing from {WEIGHTS_NAME}; the file is incomplete.")
            saved = tuple(header[key]["shape"])
            if saved != tuple(shape):
                raise AdapterLoadError(
                    f"The adapter in {adapter_dir} does not fit this base model: group {spec.name!r} tensor {name} "
                    f"was saved with shape {saved}, this model needs {tuple(shape)} (group "
                    f"{spec.n_slices} x {spec.n1} x {spec.n2}: a different layer width or number of layers). Load it "
                    "onto the base network it was trained on."
                )


def restore_base_model(model: nn.Module) -> nn.Module:
    """Remove PEFT wrappers injected into ``model`` in place (used after a failed load)."""
    from ._peft_compat import BaseTunerLayer, ModulesToSaveWrapper

    for name, module in list(model.named_modules()):
        if not name:
            continue
        if isinstance(module, BaseTunerLayer) or isinstance(module, ModulesToSaveWrapper):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            original = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module.original_module
            setattr(parent, child, original)
    if hasattr(model, "peft_config"):
        del model.peft_config
    _remove_tuner_hooks(model)
    return model


def _remove_tuner_hooks(model: nn.Module) -> None:
    """Drop the forward hooks a peft_tensor tuner registered on ``model`` (its forward scope)."""
    from .tuners.tensor_group import TensorGroupTuner

    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key, hook in list(hooks.items()):
            if isinstance(getattr(hook, "__self__", None), TensorGroupTuner):
                del hooks[key]
                model._forward_hooks_always_called.pop(key, None)


def _validate(base_model: nn.Module, adapter_dir: str, subfolder: Optional[str]) -> None:
    path = Path(adapter_dir) / subfolder if subfolder else Path(adapter_dir)
    if not path.is_dir():
        return  # a Hub repo id: peft_tensor.hub validates after download
    read_adapter_config(path)
    if not (path / WEIGHTS_NAME).is_file() and (path / "adapter_model.bin").is_file():
        raise AdapterLoadError(
            f"{path} holds only a pickled adapter_model.bin; peft_tensor loads safetensors only (unpickling untrusted "
            "files can run code). Convert it with safetensors.torch.save_file in a trusted environment."
        )
    from peft.config import PeftConfig

    config = PeftConfig.from_pretrained(str(path))
    check_adapter_compatible(base_model, path, config)


# ids of the tensors whose values an enclosing restoring() already copied (a nested one need not copy them again)
_COPIED: contextvars.ContextVar[frozenset] = contextvars.ContextVar("peft_tensor_restoring", default=frozenset())


class _ModelState:
    """What a load may change on ``model``, to put back exactly: per module its class and attributes (the children,
    parameter, buffer and hook dicts by content), per parameter / buffer its storage, value, ``requires_grad`` and
    ``grad``. Values are copied to the CPU (a failed load may have written into the base weights in place)."""

    def __init__(self, model: nn.Module, skip_values: frozenset = frozenset(), copy_values: bool = True):
        import torch

        self.modules = []
        tensors: dict[int, Any] = {}
        for module in model.modules():
            attrs = dict(module.__dict__)
            contents = {k: v.copy() for k, v in attrs.items() if isinstance(v, (dict, set))}
            self.modules.append((module, type(module), attrs, contents))
            for t in (*module._parameters.values(), *module._buffers.values()):
                if t is not None:
                    tensors.setdefault(id(t), t)
        self.tensors = []
        with torch.no_grad():
            for key, t in tensors.items():
                copy = copy_values and key not in skip_values and not t.is_meta
                value = t.detach().to("cpu", copy=True) if copy else None
                self.tensors.append((t, t.data, value, t.requires_grad, t.grad))
        self.copied = frozenset(tensors)  # values saved here, by an enclosing guard, or not worth saving

    def restore(self) -> None:
        import torch

        for module, cls, attrs, contents in self.modules:
            if type(module) is not cls:
                module.__class__ = cls
            state = module.__dict__
            for key in [k for k in state if k not in attrs]:
                del state[key]
            state.update(attrs)
            for key, saved in contents.items():
                attrs[key].clear()
                attrs[key].update(saved)
        with torch.no_grad():
            for t, data, value, requires_grad, grad in self.tensors:
                if (t.data_ptr(), t.dtype, t.shape, t.device) != (data.data_ptr(), data.dtype, data.shape,
                                                                  data.device):
                    t.data = data
                if value is not None:
                    t.data.copy_(value)
                if t.requires_grad != requires_grad and t.is_leaf:
                    t.requires_grad_(requires_grad)
                if t.grad is not grad:
                    t.grad = grad


@contextlib.contextmanager
def restoring(model: nn.Module, what: str, copy_values: bool = True) -> Iterator[None]:
    """Run a load on ``model``; if it raises anything, put ``model`` back exactly as it was, then re-raise: an
    :class:`AdapterLoadError` as it is, any other ``Exception`` as an ``AdapterLoadError`` chaining it (``what``
    failed: ...), ``KeyboardInterrupt`` / ``SystemExit`` unchanged. Costs a CPU copy of the model's tensors, unless
    ``copy_values=False`` (a model nobody else holds: only its structure is restored)."""
    state = _ModelState(model, _COPIED.get(), copy_values)
    token = _COPIED.set(_COPIED.get() | state.copied)
    try:
        yield
    except BaseException as exc:
        state.restore()
        if isinstance(exc, AdapterLoadError) or not isinstance(exc, Exception):
            raise
        raise AdapterLoadError(f"{what} failed: {type(exc).__name__}: {exc}. The model was left as it was before "
                               "the load.") from exc
    finally:
        _COPIED.reset(token)


def from_pretrained(base_model: nn.Module, adapter_dir: str, adapter_name: str = "default",
                    is_trainable: bool = False, subfolder: Optional[str] = None, **kwargs):
    """``PeftModel.from_pretrained`` with validation first and the base model restored on failure; runs inside
    :func:`~peft_tensor.tuners._loading_context.loading_adapter` (no decomposition: the groups are filled from the
    file)."""
    from peft import PeftModel

    from .tuners._loading_context import loading_adapter

    with restoring(base_model, f"Loading the adapter from {adapter_dir}"), loading_adapter():
        _validate(base_model, adapter_dir, subfolder)
        if subfolder:
            kwargs["subfolder"] = subfolder
        return PeftModel.from_pretrained(base_model, adapter_dir, adapter_name=adapter_name,
                                         is_trainable=is_trainable, **kwargs)


def load_adapter_checked(peft_model, adapter_dir: str, adapter_name: str, is_trainable: bool = False,
                         subfolder: Optional[str] = None, **kwargs):
    """``PeftModel.load_adapter`` with the same validation as :func:`from_pretrained`; ``peft_model`` is restored
    (its other adapters untouched, no trace of this one) if the load fails. Runs no decomposition, as
    :func:`from_pretrained`."""
    from .tuners._loading_context import loading_adapter

    with restoring(peft_model, f"Loading the adapter from {adapter_dir}"), loading_adapter():
        _validate(peft_model.get_base_model(), adapter_dir, subfolder)
        if subfolder:
            kwargs["subfolder"] = subfolder
        return peft_model.load_adapter(adapter_dir, adapter_name=adapter_name, is_trainable=is_trainable, **kwargs)
