"""Memory-lean dense application of a tensor group's update (``delta_mode="dense"``).

A layer whose weight rows are slices ``k`` of a group computes ``y = x (W + D_k)^T + b``. Two pieces, each one
autograd node:

* :func:`group_dense_slices` -- the slices ``D_k`` ``(n1, n2)`` of a group's update ``D = sum_i A_i * B_i``,
  computed **once per model forward** through the FFT along the slice axis (``D`` contiguous ``(L, n1, n2)``; the
  slices are views, so the backward is one ``stack`` of the layers' slice gradients, not one full-size zero tensor
  per slice). The node saves no tensors, like the factors' node (:class:`~.tensor_group.autograd._Factors`): its
  backward re-derives the Fourier factors (small) and applies the adjoint of the inverse FFT to the incoming
  gradient, so ``D`` is never rebuilt in backward and the node can be traversed by several backward passes.
* :class:`DenseDeltaLinear` -- ``x (W + sum_a D^(a)_rows)^T + b`` that saves only ``x`` (and references to ``W`` and
  the slices, which are held anyway: a parameter and the group's per-forward ``D``). ``F.linear(x, W + D_rows)``
  would save the weight-sized sum ``W + D_rows`` per layer; here the sum is rebuilt in backward as a temporary.
  Gradients: ``dx = g (W + D_rows)``, ``dD_rows = g^T x`` (split into the slices), ``db = sum g``, and ``dW = g^T x``
  only if the base weight trains.

Memory of the dense mode, per dense group: ``D`` (``L n1 n2`` floats, held from the group's first use in a forward
until the next forward) and, during backward, the stacked gradient of ``D`` (same size). The factored mode holds
neither. Tensor algebra (t-product, FFT) stays in :mod:`peft_tensor.algebra`; this module is the autograd glue.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..algebra import compute_dtype, from_fourier, t_product_fourier, to_fourier
from ._group_state import (bound_buffers, bound_state, differentiable_inputs, forward_aliases, forward_buffers,
                           refuse_functorch, trainable_state)

__all__ = ["DenseDeltaLinear", "dense_linear", "dense_layer_forward", "group_dense", "group_dense_slices",
           "dense_from_factors", "from_fourier_adjoint"]

_KIND = "dense_lean"


def from_fourier_adjoint(grad: torch.Tensor, n_slices: int) -> torch.Tensor:
    """Adjoint of :func:`~peft_tensor.algebra.from_fourier` (the inverse rfft along the slice axis, ``dim=-3``):
    ``(..., L, n1, n2)`` real -> ``(..., L//2+1, n1, n2)`` complex, as autograd's backward of ``irfft`` (a forward
    rfft scaled by ``1/L``, the bins whose mirror image lies outside the one-sided range counted twice)."""
    g_hat = torch.fft.rfft(grad, dim=-3, norm="forward")
    doubled = n_slices - g_hat.shape[-3]
    if doubled > 0:
        g_hat.narrow(-3, 1, doubled).mul_(2)
    return g_hat


def dense_from_factors(pairs) -> torch.Tensor:
    """``D = sum_i A_i * B_i`` ``(L, n1, n2)`` float32 through the FFT along the (leading, contiguous) slice axis."""
    n = pairs[0][0].shape[-3]
    d_hat = None
    for a, b in pairs:
        term = t_product_fourier(to_fourier(a), to_fourier(b))  # float32, or float64 for float64 factors
        d_hat = term if d_hat is None else d_hat + term
    return from_fourier(d_hat, n)


class _GroupDense(torch.autograd.Function):
    """A group's ``D`` ``(L, n1, n2)`` as one autograd node that saves no tensors (see the module docstring)."""

    @staticmethod
    def forward(ctx, group, names, *params: torch.Tensor):
        ctx.group, ctx.names, ctx.params = group, names, params
        ctx.versions = tuple(p._version for p in params)
        ctx.aliases = forward_aliases(params)  # the forward's storage, whatever .data becomes
        with torch.no_grad():
            dense = dense_from_factors(group.factors())
        ctx.buffers = forward_buffers(group)  # C, R, U0, ... as this forward used them (after any refresh)
        return dense

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        group = ctx.group
        if tuple(p._version for p in ctx.params) != ctx.versions:
            raise RuntimeError(
                f"peft_tensor: a parameter of group {group.name!r} was modified in place between the forward and the "
                "backward pass (e.g. an optimiser step before backward). Run backward before stepping."
            )
        # grad mode is on here only under create_graph=True (double backward): then nothing is detached and the
        # graph of the gradients is kept, so second-order gradients are exact
        create_graph = torch.is_grad_enabled()
        hold = (lambda t: t) if create_graph else (lambda t: t.detach())
        g_hat = from_fourier_adjoint(grad.to(compute_dtype(grad.dtype)), group.n_slices)  # (L//2+1, n1, n2)
        outs, grads = [], []
        inputs = differentiable_inputs(ctx.params, ctx.aliases)  # what was trainable when the forward ran
        with torch.enable_grad(), bound_state(group, ctx.names, inputs), bound_buffers(group, ctx.buffers):
            for (a, b), (train_a, train_b) in zip(group.factors(), group.differentiable_factors):
                if not (train_a or train_b):
                    continue
                a_hat, b_hat = to_fourier(a), to_fourier(b)
                # d_hat = a_hat @ b_hat: autograd's complex matmul backward, dA = g B^H, dB = A^H g
                if train_a and a_hat.requires_grad:
                    outs.append(a_hat)
                    grads.append(g_hat @ hold(b_hat).mH)
                if train_b and b_hat.requires_grad:
                    outs.append(b_hat)
                    grads.append(hold(a_hat).mH @ g_hat)
            if not outs:
                return (None, None) + tuple(None for _ in ctx.params)
            got = torch.autograd.grad(outs, list(inputs), grads, allow_unused=True, create_graph=create_graph)
        return (None, None) + tuple(got)


def group_dense(group) -> torch.Tensor:
    """Fresh ``D`` ``(L, n1, n2)`` float32 of ``group``, differentiable w.r.t. its trainable state."""
    group.materialize()
    with torch.autocast(device_type=group.group_shape.device.type, enabled=False):
        refuse_functorch(group)
        names, params = trainable_state(group)
        if params and torch.is_grad_enabled():
            return _GroupDense.apply(group, names, *params)
        with torch.no_grad():
            return dense_from_factors(group.factors())


def group_dense_slices(group, device=None) -> list[torch.Tensor]:
    """The slices ``D_k`` ``(n1, n2)`` (views of one contiguous ``D``) for this forward pass: computed once per model
    forward (and per device), fresh outside one; float32, differentiable."""
    return group._current(_KIND, lambda: list(group_dense(group).unbind(0)), device)


def _effective_weight(weight: torch.Tensor, counts: Sequence[int], slices: Sequence[torch.Tensor]) -> torch.Tensor:
    """``W + sum_a cat(slices of adapter a)`` in the weight's dtype (a new tensor; ``W`` is not modified)."""
    out, i = None, 0
    for c in counts:
        part = slices[i:i + c]
        i += c
        rows = part[0] if c == 1 else torch.cat(list(part))
        out = (weight + rows.to(weight.dtype)) if out is None else out.add_(rows.to(weight.dtype))
    return weight if out is None else out


class DenseDeltaLinear(torch.autograd.Function):
    """``y = x (W + sum_a D^(a))^T + b`` where ``D^(a)`` is the row-wise concatenation of ``counts[a]`` slices
    ``(n1, n2)``; saves ``x`` and references (no weight-sized sum). Runs under the caller's autocast state in
    forward and backward, as ``F.linear`` would."""

    @staticmethod
    def forward(ctx, x, weight, bias, counts, *slices):
        w = _effective_weight(weight, counts, slices)
        ctx.counts = tuple(counts)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.device_type = x.device.type
        ctx.autocast = torch.is_autocast_enabled(ctx.device_type)
        ctx.autocast_dtype = torch.get_autocast_dtype(ctx.device_type) if ctx.autocast else None
        ctx.save_for_backward(x, weight, *slices)
        y = F.linear(x, w, bias)
        del w
        return y

    @staticmethod
    def backward(ctx, grad):
        # plain differentiable operations on the saved tensors: under create_graph=True (grad mode on) autograd
        # records them, so second-order gradients go through this node exactly
        x, weight, *slices = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_slices = ctx.needs_input_grad[4:]
        grad_x = grad_w = grad_b = None
        grad_slices = [None] * len(slices)
        with torch.autocast(device_type=ctx.device_type, dtype=ctx.autocast_dtype, enabled=ctx.autocast):
            if need_x:
                w = _effective_weight(weight, ctx.counts, slices)  # a temporary, freed on return
                grad_x = torch.matmul(grad, w).to(x.dtype)
                del w
            if need_w or any(need_slices):
                g2 = grad.reshape(-1, grad.shape[-1])
                gw = torch.matmul(g2.t(), x.reshape(-1, x.shape[-1]))  # (out, in)
                if need_w:
                    grad_w = gw.to(weight.dtype)
                i = 0
                for c in ctx.counts:
                    row = 0
                    for j in range(i, i + c):
                        n = slices[j].shape[0]
                        if need_slices[j]:
                            grad_slices[j] = gw[row:row + n].to(slices[j].dtype)
                        row += n
                    i += c
            if need_b and ctx.bias_dtype is not None:
                grad_b = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
        return (grad_x, grad_w, grad_b, None, *grad_slices)


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias, counts: Sequence[int],
                 slices: Sequence[torch.Tensor]) -> torch.Tensor:
    """``x (W + sum_a cat(slices_a))^T + b`` through :class:`DenseDeltaLinear` (``counts[a]`` consecutive entries
    of ``slices`` belong to adapter ``a``; each adapter's slices, stacked row-wise, have ``W``'s shape); no slices:
    plain ``F.linear``."""
    if sum(counts) != len(slices):
        raise ValueError(f"counts {list(counts)} do not add up to the {len(slices)} slices given.")
    if not slices:
        return F.linear(x, weight, bias)
    return DenseDeltaLinear.apply(x, weight, bias, tuple(counts), *slices)


def dense_layer_forward(layer, x: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
    """The dense forward of a :class:`~.tensor_group.layer.TensorGroupLayer` (a Linear) for the adapters ``names``:
    ``x (W + sum D)^T + b`` through :class:`DenseDeltaLinear`.

    Per adapter the group says what is dense: by default its whole ``D`` (:func:`group_dense_slices`); a group with a
    ``dense_parts(layer, weight, device, n_tokens)`` method returns ``(weight, slice sets, remainder)`` instead: the
    weight to use from here on (the one it was given, or one with a frozen term folded in and held, e.g. LoRA-PT's
    ``W - P0``), several full lists of ``L`` slices added to it, and optionally a callable
    ``remainder(x, slice_ids, cast_input=...)`` whose output is added (a term still applied factored; ``cast_input``
    is the layer's ``cast_input_dtype_enabled``)."""
    base = layer.get_base_layer()
    weight = base.weight
    device = weight.device
    n_tokens = x.numel() // weight.shape[1]
    slices, counts, remainders = [], [], []
    for name in names:
        asg = layer.group_slices[name]
        parts = getattr(asg.group, "dense_parts", None)
        if parts is None:
            sets, remainder = [group_dense_slices(asg.group, device)], None
        else:
            weight, sets, remainder = parts(layer, weight, device, n_tokens)
        for group_slices in sets:
            slices += [group_slices[k] for k in asg.slice_ids]
            counts.append(len(asg.slice_ids))
        if remainder is not None:
            remainders.append((remainder, asg.slice_ids))
    y = dense_linear(x, weight, base.bias, counts, slices)
    for remainder, slice_ids in remainders:
        y = y + remainder(x, slice_ids, cast_input=getattr(layer, "cast_input_dtype_enabled", True)).to(y.dtype)
    return y
