"""Argument checks of PEFT's ``add_weighted_adapter``, shared by every peft_tensor tuner."""

from __future__ import annotations


def check_weighted_adapter_args(tuner, adapters: list[str], weights: list[float], adapter_name: str,
                                kwargs: dict) -> list:
    """Raise a clear ``ValueError`` on bad arguments; return the adapters' configs (all of one method)."""
    if kwargs:
        raise ValueError(f"add_weighted_adapter of {type(tuner).__name__} takes no {sorted(kwargs)} (LoRA-only "
                         "arguments).")
    if adapter_name in tuner.peft_config:
        raise ValueError(f"An adapter named {adapter_name!r} already exists; choose a new name.")
    missing = [a for a in adapters if a not in tuner.peft_config]
    if not adapters or missing:
        raise ValueError(f"add_weighted_adapter needs existing adapters; unknown: {missing or adapters}. "
                         f"This model has {sorted(tuner.peft_config)}.")
    if len(weights) != len(adapters):
        raise ValueError(f"{len(adapters)} adapters but {len(weights)} weights: give one weight per adapter.")
    configs = [tuner.peft_config[a] for a in adapters]
    if len({type(c) for c in configs}) > 1:
        raise ValueError("add_weighted_adapter combines adapters of one method; got "
                         f"{sorted({type(c).__name__ for c in configs})}.")
    return configs
