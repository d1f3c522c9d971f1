"""The wrapped layer: :class:`TensorGroupLayer`, a targeted ``nn.Linear`` or convolution whose weight rows are slices
of group tensors.

It knows its group, its slice indices and (for a fused qkv weight) their row ranges, and adds ``D_k x`` without ever
materialising ``D``: ``D_k x = sum_a A_a (B_{(k-a) mod L} x)``, i.e. one ``(N, n2) @ (n2, L q)`` product shared by all
of the layer's slices and one ``(N, L q) @ (L q, n1)`` product per slice. Merging materialises ``D`` through the FFT.
A convolution runs ``conv(x, W + D)`` with its kernel-sized ``D``, once per forward. Which of these paths serves a
call (disabled, mixed batch, merged, convolution, dense, factored) is decided in one place,
:meth:`TensorGroupLayer._route`.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..._peft_compat import (
    BaseTunerLayer,
    check_adapters_to_merge,
    conv_forward,
    is_conv_transpose,
    transposed_output_padding,
)
from ...algebra import compute_dtype
from ...errors import MergeError
from .._dense_linear import dense_layer_forward
from .._mixed_batch import check_mixed_batch, sub_batches
from .._targets import is_conv
from ..grouping import from_matrix_view
from .state import SliceAssignment

__all__ = ["TensorGroupLayer"]


class TensorGroupLayer(nn.Module, BaseTunerLayer):
    """A targeted ``nn.Linear`` or convolution whose weight rows (of its matrix view, for a convolution) are slices of
    group tensors (one assignment per adapter).

    The trainable state lives on the tuner (once per adapter), so this layer registers no adapter parameters;
    it holds plain references to its groups. A Linear adds ``D_k x`` through the thin factors (or runs ``x (W + D)^T``
    under ``delta_mode='dense'``); a convolution always runs ``conv(x, W + D)`` with its kernel-sized ``D``.
    """

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ("group_slices",)

    def __init__(self, base_layer: nn.Linear, adapter_name: str, **kwargs) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.group_slices: dict[str, SliceAssignment] = {}
        self._active_adapter = adapter_name
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        # PEFT's switch (peft.helpers.disable_input_dtype_casting): off, the factored path multiplies the input in its
        # own dtype with the float32 factors, as LoRA's lora_A does (the convolution and dense paths cast no input:
        # they run the base layer's op with W + D in the weight's dtype)
        self.cast_input_dtype_enabled: bool = True
        self.is_conv = is_conv(base_layer)
        self.in_features = base_layer.in_channels if self.is_conv else base_layer.in_features
        self.out_features = base_layer.out_channels if self.is_conv else base_layer.out_features
        self.kwargs = kwargs

    def assign(self, adapter_name: str, assignment: SliceAssignment) -> None:
        self.group_slices[adapter_name] = assignment

    def get_delta_weight(self, adapter_name: str, dense_cache: Optional[dict] = None) -> torch.Tensor:
        """Update of this layer's weight for one adapter, in the weight's shape (``out x in`` for a Linear), float32.
        ``dense_cache`` (group id -> ``D``) lets several layers of one group share one materialisation of ``D``."""
        asg = self.group_slices[adapter_name]
        cache = {} if dense_cache is None else dense_cache
        if id(asg.group) not in cache:
            cache[id(asg.group)] = asg.group.dense_delta()
        rows = cache[id(asg.group)][list(asg.slice_ids)].reshape(-1, asg.group.n2)
        return from_matrix_view(rows, self.get_base_layer(), asg.conv_layout)

    def unmerged_base_weight(self, dense_cache: Optional[dict] = None) -> torch.Tensor:
        """The base weight with every merged adapter's update subtracted (what the adapters were built from)."""
        weight = self.get_base_layer().weight.detach()
        if not self.merged_adapters:
            return weight
        out = weight.to(compute_dtype(weight.dtype))
        for name in self.merged_adapters:
            if name in self.group_slices:
                out = out - self.get_delta_weight(name, dense_cache).to(out.device)
        return out

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.group_slices:
                continue
            delta = self.get_delta_weight(name).to(base.weight.device)
            # add in float32 and round once: a half-precision weight gets the correctly rounded merged value
            merged = base.weight.data.to(compute_dtype(base.weight.dtype)) + delta
            if safe_merge and not torch.isfinite(merged).all():
                raise MergeError(
                    f"Merging adapter {name!r} would put NaN/inf into {type(base).__name__} weights; the adapter "
                    "seems broken (diverged training?). Nothing was merged into this layer."
                )
            base.weight.data.copy_(merged.to(base.weight.dtype))
            self.merged_adapters.append(name)
            self._base_weight_changed()

    def _base_weight_changed(self) -> None:
        for asg in self.group_slices.values():
            asg.group.base_weight_changed(self)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.group_slices:
                delta = self.get_delta_weight(name).to(base.weight.device)
                weight = base.weight.data
                weight.copy_((weight.to(compute_dtype(weight.dtype)) - delta).to(weight.dtype))
                self._base_weight_changed()

    def _delta(self, name: str, x: torch.Tensor) -> Optional[torch.Tensor]:
        asg = self.group_slices.get(name)
        if asg is None:
            return None
        return asg.group.delta_output(x, asg.slice_ids, cast_input=getattr(self, "cast_input_dtype_enabled", True))

    def _route(self, x: torch.Tensor, args: tuple, kwargs: dict,
               adapter_names: Optional[list[str]]) -> tuple[str, list[str]]:
        """Which path serves this call, and (path ``"dense"``) the adapters that take it.

        * ``"disabled"``: adapters disabled (a merged layer is unmerged first), the base layer alone;
        * ``"mixed"``: a mixed-adapter batch (PEFT's ``adapter_names=``), each adapter on its own samples;
        * ``"merged"``: the base layer, which holds the merged update;
        * ``"conv"``: ``conv(x, W + D)`` with this forward's kernel-sized ``D`` of each active adapter;
        * ``"dense"``: a Linear whose groups prefer ``x (W + D)^T`` (``delta_mode``, see
          :meth:`.TensorGroup.prefers_dense`; the other active adapters stay factored);
        * ``"factored"``: the base layer plus ``D_k x`` through the thin factors.
        """
        if self.disable_adapters:
            return "disabled", []
        if adapter_names is not None:
            return "mixed", []
        if self.merged:
            return "merged", []
        if self.is_conv:
            return "conv", []
        if not args and not kwargs:
            n_tokens = x.numel() // self.in_features
            dense = [n for n in self.active_adapters
                     if n in self.group_slices and self.group_slices[n].group.prefers_dense(n_tokens)]
            if dense:
                return "dense", dense
        return "factored", []

    def forward(self, x: torch.Tensor, *args: Any, adapter_names: Optional[list[str]] = None,
                **kwargs: Any) -> torch.Tensor:
        path, dense = self._route(x, args, kwargs, adapter_names)
        if path == "disabled":
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if path == "mixed":
            return self._mixed_forward(x, args, kwargs, adapter_names)
        if path == "merged":
            return self.base_layer(x, *args, **kwargs)
        if path == "conv":
            return self._adapted_conv(x, list(self.active_adapters), args, kwargs)
        if path == "dense":
            return self._add_factored(self._dense_forward(x, dense), x, skip=dense)
        return self._add_factored(self.base_layer(x, *args, **kwargs), x)

    def _add_factored(self, result: torch.Tensor, x: torch.Tensor, skip: tuple | list = ()) -> torch.Tensor:
        """``result + D_k x`` of every active adapter not in ``skip``, through the thin factors."""
        for name in self.active_adapters:
            if name not in skip:
                delta = self._delta(name, x)
                if delta is not None:
                    result = result + delta.to(result.dtype)
        return result

    def _mixed_forward(self, x: torch.Tensor, args: tuple, kwargs: dict, adapter_names: list[str]) -> torch.Tensor:
        """A mixed-adapter batch: each adapter's samples get that adapter's update (a convolution runs
        ``conv(x, W + D)`` on them as a batch of their own: the same numbers as a plain run)."""
        result = self.base_layer(x, *args, **kwargs)
        check_mixed_batch(x, adapter_names)
        for name, rows in sub_batches(adapter_names, x.device):
            if name not in self.group_slices:
                continue
            if self.is_conv:
                result[rows] = self._adapted_conv(x[rows], [name], args, kwargs).to(result.dtype)
            else:
                result[rows] = result[rows] + self._delta(name, x[rows]).to(result.dtype)
        return result

    def _dense_forward(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        """``x (W + sum D_k)^T + b``: the base layer with the adapters' dense slices added to its weight, through
        :func:`._dense_linear.dense_layer_forward` (saves ``x`` only, not a weight-sized ``W + D_k`` per layer; each
        group's ``D`` is built once per forward through the FFT; a group may keep a term factored or hold a frozen
        dense term, see there)."""
        return dense_layer_forward(self, x, names)

    # -- convolutions: conv(x, W + D) with the kernel-sized D of this forward pass ----------------------------------
    def _kernel_delta(self, name: str, device) -> Optional[torch.Tensor]:
        """This forward's update of the kernel for adapter ``name`` (float32, weight-shaped, differentiable)."""
        asg = self.group_slices.get(name)
        if asg is None:
            return None
        slices = asg.group.current_dense(device=device)
        ids = asg.slice_ids
        rows = slices[ids[0]] if len(ids) == 1 else torch.cat([slices[k] for k in ids])
        return from_matrix_view(rows, self.get_base_layer(), asg.conv_layout)

    def _adapted_conv(self, x: torch.Tensor, names, args: tuple, kwargs: dict) -> torch.Tensor:
        base = self.get_base_layer()
        weight = base.weight
        deltas = [d for d in (self._kernel_delta(n, weight.device) for n in names) if d is not None]
        if not deltas:
            return base(x, *args, **kwargs)
        for delta in deltas:
            weight = weight + delta.to(weight.dtype)
        if is_conv_transpose(base):
            output_padding = transposed_output_padding(base, x, args[0] if args else kwargs.get("output_size"))
            n_spatial = base.weight.dim() - 2
            fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[n_spatial - 1]
            return fn(x, weight, base.bias, base.stride, base.padding, output_padding, base.groups, base.dilation)
        return conv_forward(base, x, weight, base.bias)

    def __repr__(self) -> str:
        rep = super().__repr__()
        return f"{type(self).__name__.split('.')[-1].lower()}." + rep
