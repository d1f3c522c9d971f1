"""A group's state: :class:`TensorGroup` (one group tensor's update for one adapter, its state dict and its
per-forward cache), :class:`SliceAssignment` (what a wrapped layer knows of one adapter), :class:`ForwardScope` (the
model's forward passes) and :func:`cache_build`.

A group's factors are computed **once per forward pass of the model** and cached; the cache key holds the version
counters of its tensors and a forward counter, so it is never stale (after an optimiser step, under ``no_grad``, with
gradient accumulation, after load, merge or unmerge). The autograd node that computes them is
:class:`.autograd._Factors`.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ...errors import AdapterLoadError
from .._dense_linear import dense_from_factors
from .._group_state import refuse_functorch, trainable_state
from .._loading_context import is_loading_adapter
from ..grouping import GroupSpec, matrix_view
from .autograd import _Factors

__all__ = ["cache_build", "ForwardScope", "SliceAssignment", "TensorGroup"]


@contextmanager
def cache_build():
    """Where a tensor kept across forward passes (an index, a frozen product) is built: without autograd and outside
    inference mode, so that one built during a ``torch.inference_mode()`` evaluation is a normal tensor, which a later
    training step can save for backward (an inference tensor cannot be)."""
    with torch.inference_mode(False), torch.no_grad():
        yield


class ForwardScope:
    """Marks the forward passes of the adapted model (a pre-hook and an always-called post-hook on the model).

    Inside a model forward, each group computes its factors once (on first use) and every layer of the group re-uses
    them; outside one (a submodule called directly, a checkpointed block recomputed during backward) layers compute
    fresh factors, so nothing can be stale: not after an optimiser step, an in-place ``.data`` edit, a load, a merge.
    """

    def __init__(self) -> None:
        self.epoch = 0
        self.depth = 0

    @property
    def active(self) -> bool:
        return self.depth > 0

    def enter(self) -> None:
        if self.depth == 0:
            self.epoch += 1
        self.depth += 1

    def exit(self) -> None:
        self.depth = max(0, self.depth - 1)


def _device_of(value) -> torch.device:
    first = value[0]
    return first.device if isinstance(first, torch.Tensor) else first[0].device


def _to_device(value, device):
    return [v.to(device) if isinstance(v, torch.Tensor) else (v[0].to(device), v[1].to(device)) for v in value]


def _incomplete_message(group: str, keys: list[str]) -> str:
    return (f"The adapter file lacks tensors that group {group!r} needs to reproduce the trained adapter: "
            f"{', '.join(keys)}. Loading it would silently give a freshly decomposed (untrained) group. The file is "
            "incomplete (truncated, filtered, or written for another grouping/config): save the adapter again from "
            "the trained model with save_pretrained.")


def _refuse_incomplete_adapter_load(module: nn.Module, incompatible_keys) -> None:
    """Load post-hook of an adapter's list of groups: a load that filled some of the adapter's groups must fill all
    of the groups that were built empty for a file (a group the file lacks would stay an untrained decomposition)."""
    seen = [g.__dict__.pop("_load_seen", None) for g in module]
    if not any(s is not None and s[1] for s in seen):
        return  # this load was not about this adapter
    for group, s in zip(module, seen):
        if group._pending is not None and s is not None and not s[1]:
            raise AdapterLoadError(_incomplete_message(group.name, [s[0] + n for n in sorted(group.required_names())]))


@dataclass
class SliceAssignment:
    """What a wrapped layer needs to know about one adapter: its group and its slices (row order)."""

    group: "TensorGroup"
    slice_ids: tuple[int, ...]
    row_ranges: tuple[tuple[int, int], ...]
    conv_layout: str = "kernel"  # the matrix view of a convolution's kernel the rows refer to


class TensorGroup(nn.Module):
    """State of one group tensor for one adapter. Subclasses define the factors.

    Subclass contract:

    * ``expected_shapes(spec, config)``: name -> shape of every saved tensor (checked before loading a file);
      ``param_names``: which of them are trainable parameters; ``index_names``: which are int64 index buffers.
    * ``_configure(config)``: plain (non-tensor) settings, called before anything else.
    * ``_init_from_weight(W, config)``: create parameters/buffers from the stacked weight ``W`` ``(L, n1, n2)``
      (float32) -- the decomposition. It is *not* run when an adapter is loaded from a file: the group is then built
      empty (``deferred``) and filled by the state dict; a deferred group that is used before anything was loaded
      into it runs the decomposition then, once.
    * ``factors()``: a list of real pairs ``A_i (L, n1, q_i)``, ``B_i (L, q_i, n2)`` with ``D = sum_i A_i * B_i``;
      ``differentiable_factors``: per pair, whether ``A_i`` / ``B_i`` depend on trainable state (a factor that does
      not costs no weight-gradient product in the backward pass).
    * ``refresh_frozen()`` (optional): rebuild non-persistent buffers from the (unmerged) base weights after a load.
    """

    param_names: tuple[str, ...] = ()
    index_names: tuple[str, ...] = ()
    optional_names: tuple[str, ...] = ()  # saved, but a file without them still loads (added in later versions)
    differentiable_factors: tuple[tuple[bool, bool], ...] = ((True, True),)

    def __init__(self, spec: GroupSpec, sources: list, scope: ForwardScope, config, *, deferred: bool = False,
                 device=None) -> None:
        super().__init__()
        self.name = spec.name
        self.n_slices, self.n1, self.n2 = spec.n_slices, spec.n1, spec.n2
        self.rank = spec.rank if spec.rank is not None else config.r  # per group: rank_pattern, rank_cap
        self.members = tuple(spec.members)  # module names of the slices (plain strings, for messages)
        # unregistered references: the layers are owned by the base model, the scope by the tuner
        self.__dict__["_sources"] = sources  # [(layer, row_start, row_end)] in slice order
        self.__dict__["_scope"] = scope
        self.__dict__["_live"] = {}
        self.__dict__["_pending"] = None
        self._roll = {}
        self.delta_mode = getattr(config, "delta_mode", "factored")
        self.conv_layout = getattr(config, "conv_layout", None) or "kernel"
        self._configure(config)
        # saved with the adapter so a load onto a different network is refused by value, not only by shape
        group_shape = torch.tensor([self.n_slices, self.n1, self.n2], dtype=torch.int64)
        if deferred:
            self.register_buffer("group_shape", group_shape.to("cpu" if device is None or str(device) == "meta"
                                                               else device))
            self._init_empty(spec, config, device)
            self.__dict__["_pending"] = config
        else:
            self.register_buffer("group_shape", group_shape)
            with torch.no_grad():
                self._init_from_weight(self.stacked_weight(), config)
                self._canonical_layout()

    # what a group derives and keeps off the module (per-forward values, frozen products, held dense terms, keyed by
    # the layers and versions of the original): a copy starts without them and rebuilds them on use
    _TRANSIENT = frozenset({"_live", "_folded", "_p0", "_g0", "_rows_hat_cache", "_scale_cache", "_frozen_key",
                            "_load_seen"})

    def __deepcopy__(self, memo):
        """``copy.deepcopy`` (an EMA or mean-teacher copy of the adapted model) after a forward pass: the per-forward
        cache holds non-leaf tensors, which deepcopy refuses, so the copy starts with empty caches."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key not in self._TRANSIENT:
                new.__dict__[key] = copy.deepcopy(value, memo)
        new.__dict__["_live"] = {}
        return new

    # -- construction ------------------------------------------------------------------------------------------
    def stacked_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The group tensor ``(L, n1, n2)`` gathered from the *unmerged* base weights (merged adapters subtracted);
        a convolution contributes rows of its kernel's matrix view."""
        weights, dense_cache = {}, {}
        rows = []
        for layer, r0, r1 in self._sources:
            if id(layer) not in weights:
                weights[id(layer)] = matrix_view(layer.unmerged_base_weight(dense_cache), layer.get_base_layer(),
                                                 self.conv_layout)
            rows.append(weights[id(layer)][r0:r1].to(dtype))
        return torch.stack(rows, dim=0)

    @staticmethod
    def expected_shapes(spec: GroupSpec, config) -> dict[str, tuple[int, ...]]:  # pragma: no cover - abstract
        """Shapes of the saved tensors of a group planned as ``spec`` (checked before loading an adapter)."""
        raise NotImplementedError

    def _configure(self, config) -> None:
        """Plain settings from the config (no tensors)."""

    def _init_from_weight(self, weight: torch.Tensor, config) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _init_empty(self, spec: GroupSpec, config, device) -> None:
        """Uninitialised tensors of the saved shapes (``device="meta"`` under ``low_cpu_mem_usage``)."""
        for name, shape in self.expected_shapes(spec, config).items():
            if name in self.index_names:
                self.register_buffer(name, torch.zeros(shape, dtype=torch.int64, device=device))
            elif name in self.param_names:
                setattr(self, name, nn.Parameter(torch.empty(shape, device=device)))
            else:
                self.register_buffer(name, torch.empty(shape, device=device))

    def materialize(self) -> None:
        """Run the decomposition of a deferred group that nothing was loaded into (no-op otherwise)."""
        config = self._pending
        if config is None:
            return
        self.__dict__["_pending"] = None
        old = {n: getattr(self, n) for n in self.param_names}
        device = self.group_shape.device
        with torch.no_grad():
            self._init_from_weight(self.stacked_weight().to(device), config)
            self._canonical_layout()
            for name, param in old.items():  # keep Parameter identity (an optimiser may already hold it)
                new = getattr(self, name)
                if param.device.type != "meta" and param.shape == new.shape:
                    param.data = new.data.to(param.dtype)
                    param.requires_grad_(new.requires_grad or param.requires_grad)
                    setattr(self, name, param)

    def _canonical_layout(self) -> None:
        """Store every tensor of a decomposition contiguous, the layout a state dict is loaded into.

        A decomposition may return strided views (``t_pinv``'s core has the slice axis fastest); MKL picks its FFT and
        GEMM kernels by memory layout as well as by CPU, so the same values in another layout can round differently.
        With one layout, a freshly decomposed group and the same group loaded from its file run the same operations on
        the same data: save then load is exact on every CPU by construction, not by the kernels' luck.
        """
        for name, param in self.named_parameters(recurse=False):
            if not param.is_contiguous():
                param.data = param.data.contiguous()
        for name, buf in self.named_buffers(recurse=False):
            if buf is not None and not buf.is_contiguous():
                self.register_buffer(name, buf.contiguous(), persistent=name not in self._non_persistent_buffers_set)

    def refresh_frozen(self) -> None:
        """Rebuild derived, non-persistent buffers (called after loading a state dict)."""

    def base_weight_changed(self, layer) -> None:
        """``layer``'s base weight was rewritten through ``.data`` (merge, unmerge), which its version counter does not
        record: drop whatever this group derived from it (default: nothing)."""

    @classmethod
    def combine(cls, groups: list[list["TensorGroup"]], weights: list[float], configs: list,
                combination_type: Optional[str]):  # pragma: no cover - abstract
        """``(config, [saved tensors of each group])`` of the exact weighted sum of adapters (see the tuner)."""
        raise NotImplementedError

    def factors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def required_names(self) -> set[str]:
        """Saved tensors a file must hold to reproduce this group's outputs (persistent state minus
        ``optional_names``)."""
        persistent = {n for n, _ in self.named_parameters(recurse=False)} | {
            n for n, _ in self.named_buffers(recurse=False) if n not in self._non_persistent_buffers_set}
        return persistent - set(self.optional_names)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        mine = [k for k in state_dict if k.startswith(prefix) and "." not in k[len(prefix):]]
        self.__dict__["_load_seen"] = (prefix, bool(mine))
        if mine and self._pending is not None:
            # a group built empty for a file: whatever the file lacks would stay a fresh decomposition (an untrained
            # adapter, silently) -- refuse before anything is loaded into it
            missing = sorted(self.required_names() - {k[len(prefix):] for k in mine})
            if missing:
                raise AdapterLoadError(_incomplete_message(self.name, [prefix + n for n in missing]))
        saved = state_dict.get(prefix + "group_shape")
        if saved is not None and saved.tolist() != self.group_shape.tolist():
            raise AdapterLoadError(
                f"Group {self.name!r} of this adapter was saved as a {' x '.join(map(str, saved.tolist()))} tensor, "
                f"but this base model gives {self.n_slices} x {self.n1} x {self.n2}: the adapter belongs to another "
                "network. "
                "Load it onto the base model it was trained on."
            )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if mine:
            received = {k[len(prefix):] for k in mine}
            for name in self.optional_names:  # older files may lack them: not a missing key
                if name not in received and prefix + name in missing_keys:
                    missing_keys.remove(prefix + name)
            if self.required_names() <= received:
                self.__dict__["_pending"] = None
            self.refresh_frozen()
            self._after_load(state_dict, prefix, received)
        self._live.clear()

    def _after_load(self, state_dict, prefix: str, received: set) -> None:
        """Hook run after a state dict with this group's tensors was loaded (after ``refresh_frozen``)."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # A deferred group's state dict outside a load (saving) is its decomposition, run now. Inside a load
        # (loading_adapter(): PEFT's set_peft_model_state_dict reads model.state_dict() for its keys just before
        # loading into it) it is the empty tensors, as it is for a group on the meta device (low_cpu_mem_usage=True:
        # like any PEFT adapter built that way, its state dict holds meta tensors until a file fills it).
        if self._pending is not None and not is_loading_adapter() and not self._on_meta():
            self.materialize()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _on_meta(self) -> bool:
        return any(t.device.type == "meta" for t in self._state_tensors())

    # -- the factors, once per forward pass --------------------------------------------------------------------
    def _compute_flat(self) -> tuple[torch.Tensor, ...]:
        """``(A_flat (L q, n1), B_flat (L q, n2))`` per term, flattened: rows ``(a, j)`` of A_flat hold
        ``A_a[:, j]``."""
        flat = []
        for a, b in self.factors():
            q = a.shape[-1]
            flat.append(a.permute(0, 2, 1).reshape(self.n_slices * q, self.n1))
            flat.append(b.reshape(self.n_slices * q, self.n2))
        return tuple(flat)

    def _state_tensors(self):
        yield from self.parameters(recurse=False)
        yield from self.buffers(recurse=False)

    def _compute(self, kind: str) -> tuple[torch.Tensor, ...]:
        """'flat': the flattened factors; 'dense': the slices ``D_k`` ``(n1, n2)`` of ``D``, one tensor each (a
        layer's rows are a cat of its slices, whose backward is a split, not a full-size zero tensor per layer)."""
        if kind == "flat":
            return self._compute_flat()
        # one contiguous (L, n1, n2) D: the inverse FFT along the leading axis is 3-5x faster on CPU than a permute to
        # the last axis and back (48 x 768 x 768, one thread)
        return tuple(dense_from_factors(self.factors()).unbind(0))

    def _fresh(self, kind: str) -> tuple[torch.Tensor, ...]:
        """Fresh float32 tensors of ``kind`` ('flat' factors or 'dense' D), differentiable w.r.t. trainable state."""
        self.materialize()
        device_type = self.group_shape.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            refuse_functorch(self)
            names, params = trainable_state(self)
            if params and torch.is_grad_enabled():
                return _Factors.apply(self, kind, names, *params)
            with torch.no_grad():
                return self._compute(kind)

    def compute_factors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Fresh flattened factors ``[(A_flat, B_flat)]`` in float32, differentiable w.r.t. the trainable state."""
        outs = self._fresh("flat")
        return [(outs[i], outs[i + 1]) for i in range(0, len(outs), 2)]

    def _current(self, kind: str, compute, device=None):
        """``compute()`` once per model forward (and per device); fresh outside a model forward."""
        scope = self._scope
        grad = torch.is_grad_enabled()
        if not scope.active:
            value = compute()
        else:
            key = (scope.epoch, torch.is_inference_mode_enabled())
            hit = self._live.get(kind)
            if hit is not None and hit[0] == key and (hit[1] or not grad):
                value = hit[2]
            else:
                # drop the previous forward's value (and its device copies) before computing this one's, so that a
                # weight-sized one (a dense D) is never alive twice
                for k in [k for k in self._live if k == kind or (isinstance(k, tuple) and k[1] == kind)]:
                    del self._live[k]
                value = compute()
                self._live[kind] = (key, grad, value)
            if device is not None and _device_of(value) != device:
                moved = self._live.get(("moved", kind, device))
                if moved is None or moved[0] is not value:
                    moved = (value, _to_device(value, device))
                    self._live[("moved", kind, device)] = moved
                return moved[1]
        if device is not None and _device_of(value) != device:
            value = _to_device(value, device)
        return value

    def current_factors(self, device=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The factors for this forward pass: computed once per model forward (per device), fresh outside one."""
        return self._current("flat", self.compute_factors, device)

    def current_dense(self, device=None) -> list[torch.Tensor]:
        """The slices ``D_k`` ``(n1, n2)`` float32 for this forward pass, once per model forward, differentiable."""
        return self._current("dense", lambda: list(self._fresh("dense")), device)

    def term_ranks(self) -> tuple[int, ...]:
        """``q_i`` of each factor pair (for the cost model); default: one term of rank ``r``."""
        return (self.rank,)

    # delta_mode='auto' per device type: the weight of the dense path's cost against the factored one's (flop counts
    # below); a device type not listed always runs factored. CPU is not listed: measured on UNETR-B's 12 blocks at 512
    # tokens x 1 (one thread, benchmarks/results/vit_blocks_cpu.md), the memory-lean dense path is still slower than
    # the factored one (tCURLoRA paper 2.25x vs 1.26x LoRA's step CPU time, LoRA-PT 2.61x vs 1.60x) and holds one
    # weight-sized D per group (step peak 1.8x LoRA's). CUDA: the plain flop comparison (H200, old dense path:
    # 0.67-0.92x LoRA's step where factored is 0.92-1.52x); re-calibrate from `bash benchmarks/gpu_check.sh`.
    DENSE_COST_SCALE: dict = {"cuda": 1.0}

    def prefers_dense(self, n_tokens: int) -> bool:
        """``delta_mode='auto'``: dense ``W_k + D_k`` when its (weighted) flop count is lower than the factored path's.

        Per forward (x3 with a backward pass), over the group's ``n_layers`` layers and ``L`` slices, on ``N`` tokens:
        factored ``N * L * sum(q_i) * (n_layers * n2 + L * n1)``; dense: the FFT materialisation of ``D``
        (``(L/2+1) * n1 * n2 * sum(q_i)`` complex multiply-adds, ~4 real each) plus, with a backward pass, one
        weight-sized gradient per slice (``N * L * n1 * n2``), times ``DENSE_COST_SCALE[device type]``.
        """
        if self.delta_mode != "auto":
            return self.delta_mode == "dense"
        scale = self.DENSE_COST_SCALE.get(self.group_shape.device.type)
        if scale is None:
            return False
        q = sum(self.term_ranks())
        n_layers = len({id(layer) for layer, _, _ in self._sources})
        grad = torch.is_grad_enabled()
        passes = 3 if grad else 1
        factored = n_tokens * self.n_slices * q * (n_layers * self.n2 + self.n_slices * self.n1) * passes
        dense = 4 * (self.n_slices // 2 + 1) * self.n1 * self.n2 * q * passes
        if grad:
            dense += n_tokens * self.n_slices * self.n1 * self.n2
        return dense * scale < factored

    def dense_delta(self) -> torch.Tensor:
        """The full update tensor ``D = sum_i A_i * B_i`` ``(L, n1, n2)``, float32 (used for merging)."""
        self.materialize()
        with torch.no_grad():
            return torch.stack(self._compute("dense"))

    def _roll_index(self, slice_ids: tuple[int, ...], device) -> torch.Tensor:
        idx = self._roll.get((slice_ids, device))
        if idx is None:
            with cache_build():
                ar = torch.arange(self.n_slices, device=device)
                idx = torch.stack([(k - ar) % self.n_slices for k in slice_ids])  # (m, L)
            self._roll[(slice_ids, device)] = idx
        return idx

    def delta_output(self, x: torch.Tensor, slice_ids: tuple[int, ...], cast_input: bool = True) -> torch.Tensor:
        """``[D_k x for k in slice_ids]`` concatenated on the last axis: ``(..., n2) -> (..., m * n1)``, float32.
        ``cast_input=False`` (the layer's ``cast_input_dtype_enabled``, PEFT's switch) multiplies ``x`` in its own
        dtype with the float32 factors, as LoRA does: under ``torch.autocast`` in the autocast dtype, outside it an
        error.

        Per term: ``h = x B_flat^T`` holds ``B_m x`` for every slice ``m`` (one matmul shared by the layer's
        slices), then ``D_k x = sum_a A_a h_{(k-a) mod L}`` is one matmul of the rolled ``h`` with ``A_flat``.
        Frozen terms (no grad) cost no weight-gradient products in the backward pass.
        """
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.n2)
        terms = self.current_factors(device=x.device)
        idx = None
        y = None
        for a_flat, b_flat in terms:
            q = a_flat.shape[0] // self.n_slices
            h = ((x2.to(b_flat.dtype) if cast_input else x2) @ b_flat.t()).view(-1, self.n_slices, q)  # B_m x
            if idx is None:
                idx = self._roll_index(slice_ids, h.device)
            hk = h[:, idx].reshape(x2.shape[0], len(slice_ids), self.n_slices * q)  # B_{k-a} x over a
            term = hk @ a_flat  # (N, m, n1)
            y = term if y is None else y + term
        return y.reshape(*lead, len(slice_ids) * self.n1)
