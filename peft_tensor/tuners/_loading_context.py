"""Deferred initialisation as an explicit context: the adapter being built is about to be filled from a file.

A tensor-group adapter (tCURLoRA, LoRA-PT) is normally initialised by a decomposition of the base weights (tensor
CUR, t-SVD), a HyPS adapter by the top-r SVD of each targeted weight. When the adapter is loaded, that decomposition
would be wasted work (the file holds the result), so the loaders enter :func:`loading_adapter` around the whole load.
While it is active:

* ``TensorGroupTuner.inject_adapter`` builds the new adapter's groups *empty* (``deferred``), to be filled by the
  state dict that follows (a deferred group used before anything was loaded into it decomposes then, once);
* a deferred group's ``state_dict()`` returns its empty tensors without decomposing (PEFT's
  ``set_peft_model_state_dict`` reads ``model.state_dict()`` for its keys just before loading into it);
* HyPS layers build the new adapter's factors empty in the same way (no SVD of the base weights), to be filled by the
  state dict (see :class:`peft_tensor.tuners.hyps.HyPSLayer`).

The same deferral applies inside PEFT's ``init_empty_weights`` (``low_cpu_mem_usage=True``; see
:func:`inside_init_empty_weights`), where the adapter's parameters land on the meta device for a file to fill.

Who enters it: ``peft_tensor.from_pretrained`` / ``load_adapter_checked``, ``peft_tensor.hub.load_pretrained``,
``PeftModel.from_pretrained`` / ``PeftModel.load_adapter`` (wrapped once at import by
:func:`peft_tensor._registration.install_loader_hooks`), and ``add_weighted_adapter`` (its groups are filled from the
combined tensors). Only peft_tensor's tuners read it, so for PEFT's own methods it changes nothing.

The state is a :class:`contextvars.ContextVar`: per thread and per asyncio task, nested entries restore the outer
value on exit, and nothing is written into a config or a module.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch
from torch import nn

__all__ = ["inside_init_empty_weights", "is_loading_adapter", "loading_adapter"]

_LOADING: contextvars.ContextVar[bool] = contextvars.ContextVar("peft_tensor_loading_adapter", default=False)


@contextlib.contextmanager
def loading_adapter() -> Iterator[None]:
    """Within this block, adapters injected by peft_tensor's tensor-group tuners are built empty for a state dict,
    and reading the state dict of such an empty group runs no decomposition."""
    token = _LOADING.set(True)
    try:
        yield
    finally:
        _LOADING.reset(token)


def is_loading_adapter() -> bool:
    """True inside :func:`loading_adapter`."""
    return _LOADING.get()


def inside_init_empty_weights() -> bool:
    """True under PEFT's/accelerate's ``init_empty_weights`` (``get_peft_model(..., low_cpu_mem_usage=True)`` builds
    the tuner inside it without passing the flag on): parameters registered there land on the meta device."""
    probe = nn.Module()
    probe.register_parameter("p", nn.Parameter(torch.empty(0)))
    return probe.p.device.type == "meta"
