"""Target discovery shared by every peft_tensor tuner: which layers a config matches, and one wording for the errors
when it matches nothing or something the method cannot adapt. Runs before the model is touched.

Every method (tCURLoRA, LoRA-PT, HyPS) adapts ``nn.Linear`` and convolutions (``nn.Conv1d/2d/3d``,
``nn.ConvTranspose1d/2d/3d`` with ``groups=1``): :func:`find_targets` with ``convolutions=True``.
"""

from __future__ import annotations

from torch import nn

from .._peft_compat import BaseTunerLayer, check_target_module_exists
from ..errors import TargetModulesError

__all__ = ["CONV_TYPES", "find_targets", "is_conv"]

_SKIP_PARTS = {"base_layer", "modules_to_save", "original_module"}
_LISTED = 12
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONV_HINT = ("tCURLoRA, LoRA-PT and HyPS also adapt convolutions (target the Conv3d / ConvTranspose3d modules, or "
              "use the recipes' whole-network arms tcurlora_full / lorapt_full / hyps_full)")


def is_conv(module: nn.Module) -> bool:
    return isinstance(module, CONV_TYPES)


def _suffixes(names: list[str]) -> str:
    suffixes = list(dict.fromkeys(".".join(n.split(".")[-2:]) for n in names))  # 'attn.qkv', not 12 copies
    return ", ".join(repr(n) for n in suffixes[:_LISTED]) + (" ..." if len(suffixes) > _LISTED else "")


def find_targets(model: nn.Module, config, *, convolutions: bool = True) -> list[tuple[str, nn.Module]]:
    """Matched ``(module name, base layer)`` in module order: ``nn.Linear`` and, with ``convolutions=True``, the
    convolutions of :data:`CONV_TYPES` (``groups=1``).

    Raises:
        TargetModulesError: the config matches a module of another type (names them), a grouped or depthwise
            convolution, or nothing (lists the model's adaptable layers, or says the network has none).
    """
    method = type(config).__name__.replace("Config", "")
    kinds = (nn.Linear, *CONV_TYPES) if convolutions else (nn.Linear,)
    what = "nn.Linear and convolution (Conv1d/2d/3d, ConvTranspose1d/2d/3d)" if convolutions else "nn.Linear"
    tuner_layers = [name + "." for name, m in model.named_modules() if name and isinstance(m, BaseTunerLayer)]
    matches, unsupported, grouped, linears, convs = [], [], [], [], []
    for name, module in model.named_modules():
        if not name or _SKIP_PARTS & set(name.split(".")) or any(name.startswith(p) for p in tuner_layers):
            continue  # PEFT's own wrappers and the adapters' inner modules
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if isinstance(base, nn.Linear):
            linears.append(name)
        elif is_conv(base):
            convs.append(name)
        hit = check_target_module_exists(config, name)
        if not hit or type(hit).__name__ == "_ExcludedModule":
            continue
        if isinstance(base, kinds):
            if is_conv(base) and base.groups != 1:
                grouped.append(f"{name} ({type(base).__name__}, groups={base.groups})")
            else:
                matches.append((name, base))
        else:
            unsupported.append(f"{name} ({type(base).__name__})")
    if grouped:
        raise TargetModulesError(
            f"{method} target_modules={config.target_modules!r} matched grouped/depthwise convolutions: "
            f"{', '.join(grouped[:5])}{' ...' if len(grouped) > 5 else ''}. Only groups=1 is supported (a grouped "
            "kernel is not one out x in matrix per kernel position). Add them to exclude_modules."
        )
    if not linears and not (convolutions and convs):
        raise TargetModulesError(
            f"{method} target_modules={config.target_modules!r}: {type(model).__name__} has no nn.Linear layer at all "
            f"(a convolutional network?). {method} adapts {what} layers only. {_CONV_HINT}; PEFT's LoraConfig also "
            "supports Conv3d targets."
        )
    if unsupported:
        hint = "" if convolutions else f" ({_CONV_HINT})"
        raise TargetModulesError(
            f"{method} adapts {what} layers only{hint}, but target_modules={config.target_modules!r} also matched "
            f"{', '.join(unsupported[:5])}{' ...' if len(unsupported) > 5 else ''}. Narrow target_modules (e.g. "
            "'attn.proj' instead of 'proj', 'conv_block.conv1.conv' instead of 'conv1') or add those modules to "
            "exclude_modules."
        )
    if not matches:
        filtered = " outside exclude_modules" if config.exclude_modules else ""
        layers = f"Its nn.Linear layers end in: {_suffixes(linears)}." if linears else "It has no nn.Linear layer."
        if convolutions and convs:
            layers += f" Its convolutions end in: {_suffixes(convs)}."
        elif convs:
            layers += f" ({_CONV_HINT}.)"
        raise TargetModulesError(
            f"{method} target_modules={config.target_modules!r} matched no module of {type(model).__name__}"
            f"{filtered}. {layers} Names match as suffixes ('attn.qkv') or, for a string, as a full regex."
        )
    return matches
