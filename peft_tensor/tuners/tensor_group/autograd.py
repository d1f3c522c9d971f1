"""The autograd node of a group's factors: :class:`_Factors` (its backward recomputes them from aliases of exactly the
tensors the forward used: parameters and buffers; nothing is read from the module at backward time)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .._group_state import bound_buffers, bound_state, differentiable_inputs, forward_aliases, forward_buffers

if TYPE_CHECKING:
    from .state import TensorGroup

__all__ = ["_Factors"]


class _Factors(torch.autograd.Function):
    """The flattened factors of a group (or its dense update ``D``) as one autograd node that *saves no tensors*.

    Its backward recomputes the factors (a few small FFTs) from detached aliases of the parameters and buffers the
    forward used (same storage, no copy: a ``.data`` rebinding or a C / R refresh in between changes nothing), and
    back-propagates through
    them: with respect to the tensors that were trainable when the forward ran (a tensor frozen between forward and
    backward still gets its gradient, as autograd gives any other node's inputs), keeping the recomputation's graph
    under ``create_graph=True`` so second-order gradients (MAML) are exact. Saving nothing is what makes the
    per-forward re-use safe: the node can be traversed by several backward passes (re-entrant checkpointing runs one
    per checkpointed block; a submodule called twice with a backward in between), and a checkpointed region that uses
    it saves the same tensors in its first run and its recomputation.
    """

    @staticmethod
    def forward(ctx, group: "TensorGroup", kind: str, names: tuple[str, ...], *params: torch.Tensor):
        ctx.group, ctx.kind, ctx.names = group, kind, names
        ctx.params = params
        ctx.versions = tuple(p._version for p in params)
        ctx.aliases = forward_aliases(params)  # the forward's storage, whatever .data becomes
        with torch.no_grad():
            outs = group._compute(kind)
        ctx.buffers = forward_buffers(group)  # C, R, U0, ... as this forward used them (after any refresh)
        # outputs must be new tensors, not the group's own buffers or views of them
        own = {t.data_ptr() for t in group._state_tensors()}
        outs = tuple(o.clone() if (o._is_view() or o.data_ptr() in own) else o for o in outs)
        if kind == "flat":
            mask = [flag for pair in group.differentiable_factors for flag in pair]
            frozen = [o for o, flag in zip(outs, mask) if not flag]
            if frozen:
                ctx.mark_non_differentiable(*frozen)
        return outs

    @staticmethod
    def backward(ctx, *grads):
        if tuple(p._version for p in ctx.params) != ctx.versions:
            raise RuntimeError(
                f"peft_tensor: a parameter of group {ctx.group.name!r} was modified in place between the forward and "
                "the backward pass (e.g. an optimiser step before backward). Run backward before stepping."
            )
        # grad mode is on in a backward pass only under create_graph=True (double backward, MAML): then the
        # recomputation's own graph is kept, so the gradients are differentiable again
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            inputs = differentiable_inputs(ctx.params, ctx.aliases)
            # what the forward saw: its parameters (functional_call, .data rebinding) and its buffers
            with bound_state(ctx.group, ctx.names, inputs), bound_buffers(ctx.group, ctx.buffers):
                outs = ctx.group._compute(ctx.kind)
            pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
            if not pairs:
                return (None, None, None) + tuple(None for _ in ctx.params)
            got = torch.autograd.grad([o for o, _ in pairs], list(inputs), [g for _, g in pairs],
                                      allow_unused=True, create_graph=create_graph)
        return (None, None, None) + tuple(got)
