"""Target discovery shared by every peft_tensor tuner: which ``nn.Linear`` layers a config matches, and one wording
for the errors when it matches nothing or something that is not an ``nn.Linear``. Runs before the model is touched."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from torch import nn

from ..errors import TargetModulesError

__all__ = ["find_linear_targets"]

_SKIP_PARTS = {"base_layer", "modules_to_save", "original_module"}
_LISTED = 12


def find_linear_targets(model: nn.Module, config) -> list[tuple[str, nn.Linear]]:
    """Matched ``(module name, base nn.Linear)`` in module order.

    Raises:
        TargetModulesError: the config matches a module that is not an ``nn.Linear`` (names them), or nothing (lists
            the model's ``nn.Linear`` names, or says the network has none and points to PEFT LoRA for convolutions).
    """
    method = type(config).__name__.replace("Config", "")
    tuner_layers = [name + "." for name, m in model.named_modules() if name and isinstance(m, BaseTunerLayer)]
    matches, unsupported, linears = [], [], []
    for name, module in model.named_modules():
        if not name or _SKIP_PARTS & set(name.split(".")) or any(name.startswith(p) for p in tuner_layers):
            continue  # PEFT's own wrappers and the adapters' inner modules
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if isinstance(base, nn.Linear):
            linears.append(name)
        hit = check_target_module_exists(config, name)
        if not hit or type(hit).__name__ == "_ExcludedModule":
            continue
        if isinstance(base, nn.Linear):
            matches.append((name, base))
        else:
            unsupported.append(f"{name} ({type(base).__name__})")
    if not linears:
        raise TargetModulesError(
            f"{method} target_modules={config.target_modules!r}: {type(model).__name__} has no nn.Linear layer at all "
            "(a convolutional network?). peft_tensor's methods adapt nn.Linear layers; for convolutions use PEFT's "
            "LoraConfig, which supports Conv3d targets."
        )
    if unsupported:
        raise TargetModulesError(
            f"{method} adapts nn.Linear layers only, but target_modules={config.target_modules!r} also matched "
            f"{', '.join(unsupported[:5])}{' ...' if len(unsupported) > 5 else ''}. Narrow target_modules (e.g. "
            "'attn.proj' instead of 'proj') or add those modules to exclude_modules."
        )
    if not matches:
        suffixes = list(dict.fromkeys(".".join(n.split(".")[-2:]) for n in linears))  # 'attn.qkv', not 12 copies
        sample = ", ".join(repr(n) for n in suffixes[:_LISTED]) + (" ..." if len(suffixes) > _LISTED else "")
        filtered = " outside exclude_modules" if config.exclude_modules else ""
        raise TargetModulesError(
            f"{method} target_modules={config.target_modules!r} matched no module of {type(model).__name__}"
            f"{filtered}. Its nn.Linear layers end in: {sample}. Names match as suffixes ('attn.qkv') or, for a "
            "string, as a full regex."
        )
    return matches
