"""Which tensors a tensor group's factors are differentiated against, and binding them again in a backward pass.

A group's factors are built by autograd nodes that save nothing (:class:`~.tensor_group.autograd._Factors`,
:class:`~._dense_linear._GroupDense`): their backward recomputes the factors from the group's attributes. The
trainable tensors the forward saw are not always the ones the group holds when backward runs:
``torch.func.functional_call`` substitutes tensors for the forward only, and a parametrization
(``torch.nn.utils.parametrize``) keeps the leaf under ``parametrizations.<name>.original``. So the forward records
the tensors by name, and the backward binds them again while it recomputes (without that, their gradients were
silently ``None``).
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn


def trainable_state(group: nn.Module) -> tuple[tuple[str, ...], tuple[torch.Tensor, ...]]:
    """Names and tensors of the group's trainable state, parametrized originals included."""
    named = [(name, p) for name, p in group.named_parameters() if p.requires_grad]
    return tuple(n for n, _ in named), tuple(p for _, p in named)


def forward_aliases(tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Detached aliases of the tensors a forward pass used (same storage, no copy). ``p.data = other`` between the
    forward and the backward rebinds ``p`` to other storage but leaves the alias on the forward's, as autograd's own
    saved tensors are (PEFT LoRA's gradient is that of the forward's weights)."""
    return tuple(t.detach() for t in tensors)


def differentiable_inputs(tensors: tuple[torch.Tensor, ...],
                          aliases: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, ...]:
    """What a backward pass differentiates against: the tensors its forward recorded as trainable, with the values
    the forward used. A tensor whose ``requires_grad`` was switched off since (frozen between forward and backward), or
    whose ``.data`` was rebound since (``aliases``: :func:`forward_aliases` taken in the forward), is replaced by a
    detached alias of the forward's storage that requires grad, so its gradient is that of the forward and the
    others' are unchanged; the others stay themselves, so a ``create_graph=True`` backward keeps the graph to them."""
    aliases = aliases if aliases is not None else tuple(t.detach() for t in tensors)
    return tuple(t if t.requires_grad and t.data_ptr() == a.data_ptr() and t.shape == a.shape
                 else a.detach().requires_grad_(True) for t, a in zip(tensors, aliases))


_REPLAYING: ContextVar[bool] = ContextVar("peft_tensor_replaying_forward", default=False)


def replaying_forward() -> bool:
    """True while a backward pass recomputes a group's factors from the tensors its forward used
    (:func:`bound_buffers`): a group must then not refresh derived state from the base weights."""
    return _REPLAYING.get()


def forward_buffers(group: nn.Module) -> dict[str, torch.Tensor]:
    """Detached aliases of the group's own buffers as the forward used them (no copy): with :func:`bound_buffers`,
    the backward recomputes from the forward's C, R, U0, ... even if a buffer is rebound or refreshed in between."""
    return {name: buf.detach() for name, buf in group._buffers.items() if buf is not None}


@contextmanager
def bound_buffers(group: nn.Module, saved: dict[str, torch.Tensor]):
    """``group``'s buffers set to ``saved`` (:func:`forward_buffers`) while a backward pass recomputes."""
    original = {name: group._buffers.get(name) for name in saved}
    token = _REPLAYING.set(True)
    try:
        group._buffers.update(saved)
        yield
    finally:
        _REPLAYING.reset(token)
        for name, buf in original.items():
            group._buffers[name] = buf


@contextmanager
def bound_state(group: nn.Module, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]):
    """``group``'s parameters ``names`` set to ``tensors`` (those its forward pass saw) for the duration."""
    swapped = []
    try:
        for name, tensor in zip(names, tensors):
            owner, _, leaf = name.rpartition(".")
            module = group.get_submodule(owner) if owner else group
            current = module._parameters.get(leaf)
            if current is not tensor:
                swapped.append((module, leaf, current))
                module._parameters[leaf] = tensor
        yield
    finally:
        for module, leaf, original in reversed(swapped):
            module._parameters[leaf] = original


def refuse_functorch(group: nn.Module) -> None:
    """A clear error instead of torch's (which names neither the package nor a way out) under ``torch.func``
    transforms (``grad``, ``vmap``, ``jacrev``, ...): the factor nodes read the group's state in backward, which
    functorch's ``setup_context`` protocol cannot express."""
    if torch._C._are_functorch_transforms_active():
        raise NotImplementedError(
            f"peft_tensor: the tensor group {getattr(group, 'name', '?')!r} (tCURLoRA / LoRA-PT) does not support "
            "torch.func transforms (grad, vmap, jacrev, ...). Use torch.autograd instead: "
            "torch.func.functional_call(model, params, (x,)) followed by loss.backward() or torch.autograd.grad "
            "gives the gradients of the substituted tensors. HyPS and PEFT LoRA do support torch.func."
        )
