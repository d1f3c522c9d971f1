"""Checked loading of adapters: clear errors *before* the base model is touched.

``PeftModel.from_pretrained`` works on our adapters once ``peft_tensor`` is imported, but a bad adapter directory
surfaces as a ``KeyError`` or a deep ``load_state_dict`` size-mismatch trace, after the base model has already
been modified in place. :func:`from_pretrained` validates first:

* ``adapter_config.json`` exists, is JSON, has a known ``peft_type``, and was not written by a newer peft_tensor;
* ``adapter_model.safetensors`` is a complete safetensors file (header parses, data covers the file exactly);
* for peft_tensor methods, the group tensors planned on *this* base model have the saved shapes (same network,
  same number of layers);

and if PEFT still fails, the base model is restored (wrappers removed) before the error is re-raised.
Only safetensors are read here; pickled ``.bin`` adapters are refused.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Optional

from torch import nn

from .errors import AdapterLoadError

__all__ = ["from_pretrained", "load_adapter_checked", "read_adapter_config", "read_config_file", "check_peft_type",
           "read_safetensors_header",
           "check_adapter_compatible", "restore_base_model"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


# peft_type -> distribution that provides it, for adapters whose method the running PEFT does not know: filled by
# each method's register(...) call (peft_tensor.registry).
from .registry import KNOWN_PROVIDERS  # noqa: E402


def read_config_file(adapter_dir: str | os.PathLike) -> dict:
    """Read ``adapter_config.json``: it must exist, be a JSON object and name its ``peft_type``."""
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise AdapterLoadError(
            f"No {CONFIG_NAME} in {adapter_dir}: is this an adapter directory (save_pretrained output)?")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterLoadError(
            f"{path} is not valid JSON ({exc}); the file is corrupted, re-save the adapter.") from exc
    if not isinstance(cfg, dict):
        raise AdapterLoadError(f"{path} must hold a JSON object, found {type(cfg).__name__}.")
    if not cfg.get("peft_type"):
        raise AdapterLoadError(
            f"{path} has no 'peft_type', so PEFT cannot tell which method wrote it. Add the method name, e.g. "
            '"peft_type": "TCURLORA" (peft_tensor provides TCURLORA, LORAPT, HYPS).'
        )
    return cfg


def check_peft_type(config: dict, provenance: Optional[dict] = None, where: str = "") -> None:
    """Refuse a peft_type the running PEFT cannot load, naming the package (and version) that provides it."""
    import peft
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    from .version import __version__

    peft_type = str(config["peft_type"])
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
        return
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
        f"not know. {hint}."
    )


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict:
    """Read and sanity-check ``adapter_config.json`` (present, JSON, peft_type present and known to PEFT)."""
    cfg = read_config_file(adapter_dir)
    check_peft_type(cfg)
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
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.config import PeftConfig

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
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

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


def from_pretrained(base_model: nn.Module, adapter_dir: str, adapter_name: str = "default",
                    is_trainable: bool = False, subfolder: Optional[str] = None, **kwargs):
    """``PeftModel.from_pretrained`` with validation first and the base model restored on failure."""
    from peft import PeftModel

    _validate(base_model, adapter_dir, subfolder)
    if subfolder:
        kwargs["subfolder"] = subfolder
    try:
        return PeftModel.from_pretrained(base_model, adapter_dir, adapter_name=adapter_name,
                                         is_trainable=is_trainable, **kwargs)
    except (RuntimeError, KeyError, ValueError) as exc:
        restore_base_model(base_model)
        if isinstance(exc, AdapterLoadError):
            raise
        raise AdapterLoadError(f"Loading the adapter from {adapter_dir} failed: {exc}") from exc


def load_adapter_checked(peft_model, adapter_dir: str, adapter_name: str, is_trainable: bool = False,
                         subfolder: Optional[str] = None, **kwargs):
    """``PeftModel.load_adapter`` with the same validation as :func:`from_pretrained`."""
    _validate(peft_model.get_base_model(), adapter_dir, subfolder)
    if subfolder:
        kwargs["subfolder"] = subfolder
    return peft_model.load_adapter(adapter_dir, adapter_name=adapter_name, is_trainable=is_trainable, **kwargs)
