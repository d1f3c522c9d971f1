"""Reading an adapter directory without touching any model: config, tensor shapes, and shape checks.

Adapter tensor names as PEFT saves them: ``base_model.model.<module path>.<adapter attribute>...`` for per-layer
state (``...attn.qkv.lora_A.weight``), ``base_model.model.<module path>.<param>`` for ``modules_to_save`` copies,
and ``base_model.<tuner attribute>...`` for state a tuner keeps once for all layers (shared tensors).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from torch import nn

from ..errors import AdapterLoadError
# one implementation of the checks and one set of file names, in peft_tensor.loading
from ..loading import (CONFIG_NAME, KNOWN_PROVIDERS, WEIGHTS_NAME, check_peft_type, read_config_file,
                       read_safetensors_header)

__all__ = ["CONFIG_NAME", "KNOWN_PROVIDERS", "PICKLED_WEIGHTS", "WEIGHTS_NAME", "check_peft_type", "read_config_file",
           "tensor_shapes", "check_shapes", "group_summary", "adapted_module_shapes", "numel"]

PICKLED_WEIGHTS = "adapter_model.bin"  # read only with allow_pickle=True
LAYER_PREFIX = "base_model.model."


def tensor_shapes(adapter_dir: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors in ``adapter_model.safetensors`` (header only, completeness checked)."""
    return {k: tuple(v["shape"]) for k, v in read_safetensors_header(Path(adapter_dir) / WEIGHTS_NAME).items()}


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def adapted_module_shapes(peft_model, adapter_name: str) -> dict[str, dict[str, list[int]]]:
    """For every base module an adapter wraps: its original parameter shapes (recorded at save time)."""
    from .._peft_compat import AuxiliaryTrainingWrapper, BaseTunerLayer, auxiliary_adapters

    base = peft_model.get_base_model()
    out: dict[str, dict[str, list[int]]] = {}
    for name, module in base.named_modules():
        if isinstance(module, BaseTunerLayer) and adapter_name in _adapter_names(module):
            original = module.get_base_layer()
        elif isinstance(module, AuxiliaryTrainingWrapper) and adapter_name in auxiliary_adapters(module):
            original = module.original_module
        else:
            continue
        out[name] = {p: list(t.shape) for p, t in original.named_parameters(recurse=False)}
    return out


def _adapter_names(layer) -> set[str]:
    names = set()
    for attr in getattr(layer, "adapter_layer_names", ()) + getattr(layer, "other_param_names", ()):
        value = getattr(layer, attr, None)
        if hasattr(value, "keys"):
            names.update(value.keys())
    return names


def check_shapes(base: nn.Module, shapes: dict[str, tuple[int, ...]], config: dict, record: dict | None,
                 where: str = "") -> None:
    """Check an adapter against a plain (not yet wrapped) base network; raise before anything is modified."""
    from .._peft_compat import PEFT_TYPE_TO_PREFIX_MAPPING

    modules = dict(base.named_modules())
    prefix = PEFT_TYPE_TO_PREFIX_MAPPING.get(str(config["peft_type"]), "")
    problems: list[str] = []
    for name, params in ((record or {}).get("module_shapes") or {}).items():
        module = modules.get(name)
        if module is None:
            problems.append(f"module {name} is missing from the base network")
            continue
        for pname, shape in params.items():
            have = getattr(module, pname, None)
            if have is None or list(have.shape) != list(shape):
                problems.append(f"{name}.{pname}: adapter expects {tuple(shape)}, base network has "
                                f"{tuple(have.shape) if have is not None else 'no such parameter'}")
    for key, shape in shapes.items():
        if not key.startswith(LAYER_PREFIX):
            continue  # tuner-level shared state
        parts = key[len(LAYER_PREFIX):].split(".")
        for cut in range(len(parts) - 1, -1, -1):
            if ".".join(parts[:cut]) in modules:
                break
        module_name, rest = ".".join(parts[:cut]), parts[cut:]
        module = modules[module_name]
        direct = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
        if len(rest) == 1 and rest[0] in direct:  # a modules_to_save copy: must match exactly
            if tuple(direct[rest[0]].shape) != shape:
                problems.append(f"{key}: adapter has {shape}, base network has {tuple(direct[rest[0]].shape)}")
        elif not (prefix and rest[0].startswith(prefix)):
            problems.append(f"{key}: the base network has no module {'.'.join(parts[:cut + 1])}")
        elif isinstance(module, nn.Linear) and len(shape) == 2 and rest[0] in ("lora_A", "lora_B"):
            want = module.in_features if rest[0] == "lora_A" else module.out_features
            got = shape[1] if rest[0] == "lora_A" else shape[0]
            if want != got:
                problems.append(f"{key}: adapter has {shape}, which does not fit {module_name} "
                                f"(Linear {module.in_features}->{module.out_features})")
    if problems:
        more = f" (and {len(problems) - 6} more)" if len(problems) > 6 else ""
        raise AdapterLoadError(
            f"{where}adapter does not fit this base network -- nothing was modified:\n  - "
            + "\n  - ".join(problems[:6]) + more
            + "\nLoad it onto the base network it was trained for (see peft_tensor.json / the model card)."
        )


def group_summary(shapes: dict[str, tuple[int, ...]], config: dict, adapted: list[str] | None = None) -> list[str]:
    """Human-readable grouping: adapted modules by name suffix, and shared (tuner-level) tensors."""
    from .._peft_compat import PEFT_TYPE_TO_PREFIX_MAPPING

    prefix = PEFT_TYPE_TO_PREFIX_MAPPING.get(str(config.get("peft_type")), "") or "\0"
    per_module: dict[str, list[str]] = {}
    shared, saved_whole = [], set()
    for key, shape in shapes.items():
        if not key.startswith(LAYER_PREFIX):
            shared.append(f"{key[len('base_model.'):]} {list(shape)}")
            continue
        parts = key[len(LAYER_PREFIX):].split(".")
        idx = next((i for i, p in enumerate(parts) if p.startswith(prefix)), None)
        if idx is None:
            saved_whole.add(".".join(parts[:-1]))
        else:
            per_module.setdefault(".".join(parts[:idx]), []).append(parts[idx])
    modules = sorted(set(per_module) | set(adapted or ()) - saved_whole)
    suffixes = Counter(".".join(n.split(".")[-2:]) for n in modules)
    lines = []
    if config.get("grouping"):
        lines.append(f"grouping={config['grouping']}")
    if modules:
        lines.append(f"{len(modules)} adapted modules: " + ", ".join(f"{s} x{c}" for s, c in sorted(suffixes.items())))
    if shared:
        lines.append(f"{len(shared)} shared tensors: " + "; ".join(shared[:6]) + (" ..." if len(shared) > 6 else ""))
    if saved_whole:
        lines.append("trained in full (modules_to_save): " + ", ".join(sorted(saved_whole)))
    return lines
