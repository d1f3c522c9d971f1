"""Per-layer ranks, for every method: PEFT LoRA's ``rank_pattern`` and the ``rank_cap`` option.

A layer's rank is ``rank_pattern[key]`` for the first key that matches its module name the way PEFT's LoRA matches it
(:func:`~peft_tensor._peft_compat.get_pattern_key`: the key is a suffix at a dot boundary, or a regex matched against
the end of the name), else ``r``.

HyPS adapts each layer alone: its rank is the layer's. tCURLoRA and LoRA-PT stack several layers into one tensor (a
*group*, :mod:`.grouping`) that has one rank: every member of a group must resolve to the same rank, else a
:class:`~peft_tensor.errors.RankError` names the members and their ranks (give them one rank, or target the layers
so that they form other groups). A rank above what a group (``min(n1, n2)`` of its slices) or a HyPS layer
(``min(out, in)`` of its matrix) allows is refused, or with ``rank_cap=True`` lowered to that bound, with one warning
listing every capped group and its new rank.
"""

from __future__ import annotations

import re
import warnings
from typing import Iterable

from .._peft_compat import get_pattern_key
from ..errors import RankError

__all__ = ["RankPlan", "cap_warning", "method_name", "rank_of", "resolve_rank_cap", "resolve_ranks"]

_METHOD_NAMES = {"TCURLORA": "tCURLoRA", "LORAPT": "LoRA-PT", "HYPS": "HyPS"}
_LISTED = 4


def method_name(config) -> str:
    """The method's name as the README writes it (tCURLoRA, LoRA-PT, HyPS)."""
    peft_type = getattr(config.peft_type, "value", config.peft_type)
    return _METHOD_NAMES.get(str(peft_type), type(config).__name__.replace("Config", ""))


def resolve_rank_cap(config) -> bool:
    """Whether ranks above a group's (layer's) bound are capped (True) or refused (False): the one place where
    ``rank_cap=None`` is decided. The tuners store the result in the config (so a saved adapter records it and loads
    with the same ranks). ``None`` caps exactly when the targets came from a whole-network preset
    (``target_modules=None``): a preset names thin layers (a 1-channel input convolution) that no single r fits."""
    if config.rank_cap is None:
        from ._targets import targets_from_preset

        return targets_from_preset(config)
    return bool(config.rank_cap)


def rank_of(config, module_name: str) -> int:
    """The rank ``rank_pattern`` gives ``module_name`` (PEFT LoRA's matching), else ``config.r``."""
    pattern = config.rank_pattern or {}
    return pattern.get(get_pattern_key(pattern.keys(), module_name), config.r)


class RankPlan:
    """The resolved rank of one group (tCURLoRA, LoRA-PT) or layer (HyPS): ``rank``, and ``requested`` when
    ``rank_cap`` lowered it."""

    __slots__ = ("name", "rank", "requested", "limit")

    def __init__(self, name: str, rank: int, requested: int, limit: int) -> None:
        self.name, self.rank, self.requested, self.limit = name, rank, requested, limit

    @property
    def capped(self) -> bool:
        return self.rank != self.requested


def _common_key(names: list[str]) -> str:
    """A rank_pattern key that matches every name: their longest common dotted suffix, else an alternation."""
    parts = [n.split(".") for n in names]
    common: list[str] = []
    for tail in zip(*(reversed(p) for p in parts)):
        if len(set(tail)) != 1:
            break
        common.insert(0, tail[0])
    if common:
        return ".".join(common)
    tails = list(dict.fromkeys(".".join(p[-2:]) for p in parts))  # 'attn.qkv', 'attn.out_proj': not 12 copies each
    return "(" + "|".join(re.escape(n) for n in (tails if len(tails) <= _LISTED else dict.fromkeys(names))) + ")"


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    return shown + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")


def resolve_ranks(config, units: Iterable[tuple[str, list[str], int, str, str]], *, unit: str = "group",
                  bound: str = "min(n1, n2)") -> list[RankPlan]:
    """The rank of each unit ``(name, member module names, bound value, what, hint)``: ``what`` describes the unit
    after "of" in an error (``"group 'shape_6x6' (3 x 6 x 6, from lin1 ...)"``), ``hint`` is appended to the ways out.

    Raises:
        RankError: members of one unit resolve to different ranks, or a rank exceeds the unit's bound and
            :func:`resolve_rank_cap` is false; each message says what to pass instead.
    """
    cap = resolve_rank_cap(config)
    method = method_name(config)
    plans = []
    for name, members, limit, what, hint in units:
        ranks = {m: rank_of(config, m) for m in members}
        if len(set(ranks.values())) > 1:
            by_rank: dict[int, list[str]] = {}
            for m, k in ranks.items():
                by_rank.setdefault(k, []).append(m)
            given = "; ".join(f"r={k} for {_listed(ms)}" for k, ms in sorted(by_rank.items()))
            raise RankError(
                f"{method} stacks the {len(members)} layers of {unit} {name!r} into one tensor, which has one rank, "
                f"but rank_pattern gives them different ranks ({given}): give all of them one rank, e.g. "
                f"rank_pattern={{{_common_key(members)!r}: {min(by_rank)}}}."
            )
        requested = next(iter(ranks.values()))
        rank = requested
        if requested > limit:
            if not cap:
                first = members[0]
                raise RankError(
                    f"{method} r={requested} exceeds {bound}={limit} of {what}. Pass "
                    f"rank_pattern={{{_common_key(members)!r}: {limit}}} or rank_cap=True (caps every such {unit} at "
                    f"its bound), choose r <= {limit}, or leave {first!r} out of target_modules{hint}."
                )
            rank = limit
        plans.append(RankPlan(name, rank, requested, limit))
    return plans


def cap_warning(config, plans: list[RankPlan], unit: str = "group", bound: str = "min(n1, n2)") -> None:
    """One warning naming every capped group (layer) and its new rank; nothing when none was capped."""
    capped = [p for p in plans if p.capped]
    if not capped:
        return
    listed = ", ".join(f"{p.name!r} r={p.requested} -> {p.rank}" for p in capped)
    warnings.warn(
        f"{method_name(config)} rank_cap=True lowered r to the {unit}'s {bound} for {len(capped)} "
        f"{unit}{'s' if len(capped) > 1 else ''}: {listed}. Set rank_pattern for them to choose other ranks.",
        UserWarning, stacklevel=4,
    )
