"""PEFT's ``adapter_names=`` mixed-adapter batches, written once for every peft_tensor tuner and layer."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["BASE_ADAPTER", "check_mixed_batch", "mixed_batch_hooks", "sub_batches"]


BASE_ADAPTER = "__base__"


def check_mixed_batch(x: torch.Tensor, adapter_names: list[str]) -> None:
    if len(adapter_names) != len(x):
        raise ValueError(
            f"Length of `adapter_names` should be the same as the number of inputs, but got {len(adapter_names)} and "
            f"{len(x)} respectively: give one adapter name per sample ('{BASE_ADAPTER}' for the base model)."
        )


def sub_batches(adapter_names: list[str], device) -> list[tuple[str, torch.Tensor]]:
    """``[(adapter, sample indices)]`` of a mixed batch, without the base model's samples."""
    out = []
    for name in dict.fromkeys(adapter_names):
        if name == BASE_ADAPTER:
            continue
        out.append((name, torch.tensor([i for i, n in enumerate(adapter_names) if n == name], device=device)))
    return out


@contextlib.contextmanager
def mixed_batch_hooks(tuner, layer_cls, adapter_names):
    """PEFT's ``adapter_names=`` mixed batches, as LoRA does them: checks at the call, then a pre-forward hook on each
    adapted layer passes the per-sample adapter names down. :data:`BASE_ADAPTER` selects the base model for a
    sample."""
    if adapter_names is None:
        yield
        return
    if tuner.training:
        raise ValueError("Cannot pass `adapter_names` when the model is in training mode: mixed-adapter batches are "
                         "for inference. Call model.eval() first.")
    if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
        raise ValueError("adapter_names must be a list of adapter names, one per sample ('__base__' for none).")
    unknown = sorted(set(adapter_names) - set(tuner.peft_config) - {BASE_ADAPTER})
    if unknown:
        raise ValueError(f"adapter_names names unknown adapters {unknown}; this model has {sorted(tuner.peft_config)} "
                         "(and '__base__' for the base model).")
    layers = [m for m in tuner.model.modules() if isinstance(m, layer_cls)]
    if any(m.merged for m in layers):
        raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` "
                         "first.")

    def pre_forward(module, args, kwargs):
        kwargs["adapter_names"] = adapter_names
        return args, kwargs

    handles = [m.register_forward_pre_hook(pre_forward, with_kwargs=True) for m in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
