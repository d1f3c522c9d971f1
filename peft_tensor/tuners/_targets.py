"""Target discovery shared by every peft_tensor tuner: the default targets (the network's preset, for
``target_modules=None``), which layers a config matches, and one wording for the errors when it matches nothing or
something the method cannot adapt. Runs before the model is touched.

Every method (tCURLoRA, LoRA-PT, HyPS) adapts ``nn.Linear`` and convolutions (``nn.Conv1d/2d/3d``,
``nn.ConvTranspose1d/2d/3d`` with ``groups=1``): :func:`find_targets` with ``convolutions=True``.
"""

from __future__ import annotations

import re
import warnings
from typing import Callable, Optional

from torch import nn

from .._peft_compat import BaseTunerLayer, check_target_module_exists
from ..errors import TargetModulesError
from ._loading_context import is_loading_adapter
from ._ranks import method_name, rank_of, resolve_rank_cap

__all__ = ["CONV_TYPES", "PartialPresetWarning", "find_targets", "is_conv", "prepare_targets", "targets_from_preset"]

_SKIP_PARTS = {"base_layer", "modules_to_save", "original_module"}
_LISTED = 8
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_PRESET_MARK = "_peft_tensor_targets"  # on the config, not a field: (id(model), preset backbone or "")


class PartialPresetWarning(UserWarning):
    """``target_modules`` cover part of a known network's preset (e.g. UNETR's list on SwinUNETR v2)."""


def is_conv(module: nn.Module) -> bool:
    return isinstance(module, CONV_TYPES)


# -- default targets ------------------------------------------------------------------------------------------------
def prepare_targets(model: nn.Module, config, rank_limit: Optional[Callable[[nn.Module], int]] = None, *,
                    check_partial: bool = True):
    """PEFT's ``_prepare_adapter_config`` for every peft_tensor tuner: ``target_modules=None`` becomes the network's
    preset (:func:`peft_tensor.preset_for`), as PEFT fills LoRA's targets for known transformers architectures; a
    target list that covers only part of the preset warns (:class:`PartialPresetWarning`, naming the preset entries
    it leaves out), once, when ``check_partial`` (the tuners fill the targets first, validate them, and let PEFT's
    own call warn: a list that is refused does not warn too). Idempotent per model. :func:`targets_from_preset` tells
    afterwards which case it was. ``rank_limit``: as for :func:`find_targets` (the layers an error suggests fit
    ``config.r``).

    Raises:
        TargetModulesError: ``target_modules=None`` on a network without a preset (the message names layers of it
            that ``target_modules`` can take).
    """
    from ..networks.specs import NetworkSpecError, preset_for

    mark = getattr(config, _PRESET_MARK, None)
    if mark is None or mark[0] != id(model):
        if config.target_modules is None:
            try:
                preset = preset_for(model)
            except NetworkSpecError:
                raise TargetModulesError(_no_preset_message(model, config, rank_limit)) from None
            config.target_modules = list(preset.target_modules)
            mark = (id(model), preset.backbone, True)
        else:
            mark = (id(model), "", is_loading_adapter())  # a saved adapter's targets were chosen when it was trained
        setattr(config, _PRESET_MARK, mark)
    if check_partial and not mark[2]:
        setattr(config, _PRESET_MARK, (*mark[:2], True))
        try:
            preset = preset_for(model)
        except NetworkSpecError:
            return config  # no preset: nothing to compare with
        _warn_partial(model, config, preset)
    return config


def _no_preset_message(model: nn.Module, config, rank_limit) -> str:
    from ..networks.specs import PRESET_NETWORKS

    layers = list(_layers(model))
    r = getattr(config, "r", None)
    example = _suggest(layers, [n for n, m in layers if _adaptable(m, True)], config, rank_limit)
    return (f"{method_name(config)} has no default targets for {type(model).__name__} (presets exist for "
            f"{', '.join(PRESET_NETWORKS)}): pass target_modules naming the layers to adapt"
            + (f", e.g. target_modules={example}." if example else f"; none of its layers allows r={r}, so lower r."))


def targets_from_preset(config) -> bool:
    """True when :func:`prepare_targets` filled ``config.target_modules`` from the network's preset (the config was
    built with ``target_modules=None``); False for targets the user named, and before the config met a model."""
    mark = getattr(config, _PRESET_MARK, None)
    return bool(mark and mark[1])


def _suffix_match(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


def _warn_partial(model: nn.Module, config, preset) -> None:
    layers = [name for name, _ in _layers(model)]
    covered = [n for n in layers if _matches(config, n)]
    excluded = {n for n in layers if _excluded(config, n)}
    in_preset = [n for n in layers if any(_suffix_match(n, e) for e in preset.target_modules)]
    if not set(covered) & set(in_preset):
        return  # another choice altogether (e.g. only the decoder's convolutions), not a part of the preset
    left = [e for e in preset.target_modules
            if any(_suffix_match(n, e) and n not in covered and n not in excluded for n in in_preset)]
    if not left:
        return
    count = sum(1 for n in in_preset if n not in covered and n not in excluded)
    net = type(model).__name__
    warnings.warn(
        f"{method_name(config)} target_modules={config.target_modules!r} cover part of {net}'s preset: they leave out "
        f"{', '.join(repr(e) for e in left)} ({count} layer{'s' if count != 1 else ''}). Pass target_modules=None to "
        f"adapt {net}'s whole preset (peft_tensor.preset_for), add those names, or list them in exclude_modules to "
        "leave them out on purpose.", PartialPresetWarning, stacklevel=2)


def _matches(config, name: str) -> bool:
    hit = check_target_module_exists(config, name)
    return bool(hit) and type(hit).__name__ != "_ExcludedModule"


def _excluded(config, name: str) -> bool:
    ex = getattr(config, "exclude_modules", None)
    if not ex:
        return False
    if isinstance(ex, str):
        return re.fullmatch(ex, name) is not None
    return any(_suffix_match(name, e) for e in ex)


# -- matching -------------------------------------------------------------------------------------------------------
def _layers(model: nn.Module):
    """``(name, base layer)`` of every module, PEFT's wrappers seen through and their internals left out."""
    tuner_layers: list[str] = []
    for name, module in model.named_modules():
        if not name or _SKIP_PARTS & set(name.split(".")) or any(name.startswith(p) for p in tuner_layers):
            continue  # PEFT's own wrappers and the adapters' inner modules
        if isinstance(module, BaseTunerLayer):
            tuner_layers.append(name + ".")
            module = module.get_base_layer()
        yield name, module


def _adaptable(module: nn.Module, convolutions: bool) -> bool:
    return isinstance(module, nn.Linear) or (convolutions and is_conv(module) and module.groups == 1)


def _fits(config, rank_limit, name: str, layer: nn.Module) -> bool:
    """Whether ``layer`` takes the rank ``config`` gives it (``rank_pattern`` or ``r``), or ``rank_cap`` lowers it."""
    return rank_limit is None or resolve_rank_cap(config) or rank_limit(layer) >= rank_of(config, name)


def _suggest(layers, candidates, config, rank_limit) -> list[str]:
    """Suffixes naming exactly the ``candidates`` (names) whose layers take the config's rank: each one works as a
    target."""
    from ..networks.specs import distinct_suffixes

    kinds = dict(layers)
    fitting = [n for n in candidates if _fits(config, rank_limit, n, kinds[n])]
    return distinct_suffixes(fitting, [n for n, _ in layers])[:_LISTED]


def find_targets(model: nn.Module, config, *, convolutions: bool = True,
                 rank_limit: Optional[Callable[[nn.Module], int]] = None) -> list[tuple[str, nn.Module]]:
    """Matched ``(module name, base layer)`` in module order: ``nn.Linear`` and, with ``convolutions=True``, the
    convolutions of :data:`CONV_TYPES` (``groups=1``). ``rank_limit(layer)``: the largest rank the method allows on
    a layer; the layers that errors suggest are those that fit ``config.r``.

    Raises:
        TargetModulesError: the config matches a module of another type (names it and its type), a grouped or
            depthwise convolution, or nothing; each message says what to pass instead, with names that work.
    """
    method = method_name(config)
    what = "nn.Linear and groups=1 convolution (Conv1d/2d/3d, ConvTranspose1d/2d/3d)" if convolutions else "nn.Linear"
    r = getattr(config, "r", None)
    layers = list(_layers(model))
    adaptable = [n for n, m in layers if _adaptable(m, convolutions)]
    matches, unsupported, grouped = [], [], []
    for name, base in layers:
        if not _matches(config, name):
            continue
        if _adaptable(base, convolutions):
            matches.append((name, base))
        elif is_conv(base) and convolutions:
            grouped.append(f"{name!r} ({type(base).__name__}, groups={base.groups})")
        else:
            unsupported.append((name, base))
    targets = f"{method} target_modules={config.target_modules!r}"
    if grouped:
        raise TargetModulesError(
            f"{targets} matched grouped/depthwise convolutions, {', '.join(grouped[:5])}{' ...' * (len(grouped) > 5)}"
            f", which {method} cannot adapt (it adapts groups=1 convolutions only: a grouped kernel is not one out x "
            "in matrix per kernel position): add them to exclude_modules."
        )
    if unsupported:
        found = ", ".join(f"{n!r} ({type(m).__name__})" for n, m in unsupported[:5]) + " ..." * (len(unsupported) > 5)
        inside = [n for n in adaptable if any(n.startswith(u + ".") for u, _ in unsupported)]
        example = _suggest(layers, inside or adaptable, config, rank_limit)
        raise TargetModulesError(
            f"{targets} matched {found}, which {method} cannot adapt (it adapts {what} layers only): "
            + (f"name the layers {'inside' if inside else 'to adapt'} instead, e.g. target_modules={example}, or add "
               f"{'those modules' if len(unsupported) > 1 else repr(unsupported[0][0])} to exclude_modules."
               if example else f"{type(model).__name__} has no such layer to name instead; train "
               f"{'those modules' if len(unsupported) > 1 else repr(unsupported[0][0])} in full through "
               "modules_to_save.")
        )
    if not matches:
        if not adaptable:
            raise TargetModulesError(
                f"{targets}: {type(model).__name__} has no {what} layer, so {method} has nothing to adapt; use it on "
                "a network that has such layers.")
        filtered = " outside exclude_modules" if config.exclude_modules else ""
        example = _suggest(layers, adaptable, config, rank_limit)
        preset = _preset_fits(model, layers, config, rank_limit)
        raise TargetModulesError(
            f"{targets} matched no module of {type(model).__name__}{filtered}: "
            + (f"pass target_modules=None for {type(model).__name__}'s preset, or " if preset else "")
            + (f"name its layers by suffix or full regex, e.g. target_modules={example}." if example else
               f"lower r: no layer of {type(model).__name__} allows r={r}.")
        )
    return matches


def _preset_fits(model: nn.Module, layers, config, rank_limit) -> bool:
    """Whether the network has a preset that the config would build with ``target_modules=None``: every layer takes
    its rank, or ``rank_cap`` (as decided for a config whose targets came from the preset) lowers it."""
    import copy

    from ..networks.specs import NetworkSpecError, preset_for

    try:
        preset = preset_for(model)
    except NetworkSpecError:
        return False
    as_preset = copy.copy(config)
    setattr(as_preset, _PRESET_MARK, (id(model), preset.backbone, True))
    chosen = [(n, m) for n, m in layers if any(_suffix_match(n, e) for e in preset.target_modules)]
    return all(_fits(as_preset, rank_limit, n, m) for n, m in chosen)
