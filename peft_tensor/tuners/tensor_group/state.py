"""Machinery shared by the cross-layer tensor methods (tCURLoRA, LoRA-PT).

Both methods adapt a *group* of weight slices ``W_k`` (see :mod:`.grouping`) by a tensor update that is a
t-product of two thin factors,

    W'_k = W_k + D_k,    D = A * B,    A: (L, n1, q),  B: (L, q, n2),

(a sum of such terms in general) where only the method decides what ``A`` and ``B`` are (tCURLoRA: ``A = C``,
``B = (U - U0) * R``; LoRA-PT: ``U * (S * V^T)`` plus the frozen ``U0 * (-(S0 * V0^T))``). Everything else lives
here, once:

* :class:`TensorGroup` -- one group's state (an ``nn.Module`` on the tuner, so it exists once per adapter and is
  saved once). Its factors are computed **once per forward pass of the model** and cached; the cache key holds the
  version counters of its tensors and a forward counter, so it is never stale (after an optimiser step, under
  ``no_grad``, with gradient accumulation, after load, merge or unmerge).
* :class:`TensorGroupLayer` -- the wrapped ``nn.Linear`` or convolution. It knows its group, its slice indices and
  (for a fused qkv weight) their row ranges, and adds ``D_k x`` without ever materialising ``D``:
  ``D_k x = sum_a A_a (B_{(k-a) mod L} x)``, i.e. one ``(N, n2) @ (n2, L q)`` product shared by all of the layer's
  slices and one ``(N, L q) @ (L q, n1)`` product per slice. Merging materialises ``D`` through the FFT.
  (Materialising ``D`` every step instead was measured ~10x slower on CPU: a 28 M-entry FFT and its gradient.)
  A convolution's slices are its kernel's matrix view (:func:`.grouping.matrix_view`); it runs ``conv(x, W + D)``
  with its kernel-sized ``D`` from the FFT, once per forward: a kernel is small next to a 3D activation, so the
  dense kernel is the cheap way there (measured in ``benchmarks/efficiency.py``, ``conv_delta`` section).
* Precision: factors, ``D`` and merges are computed in float32 whatever the model's dtype (half-precision weights
  get one correctly rounded result), and in float64 for a float64 model (``algebra.compute_dtype``); "float32" in the
  docstrings below means that compute dtype.
* :class:`TensorGroupTuner` -- the ``BaseTuner``: finds and validates targets *before* touching the model, plans
  the groups, wraps the layers, builds the groups, keeps trainable flags and the forward counter in sync, and maps
  state-dict keys so adapters save and load under any adapter name.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ...algebra import compute_dtype
from ...errors import AdapterLoadError, MergeError, RankError, TargetModulesError
from .._dense_linear import dense_from_factors, dense_layer_forward
from .._group_state import bound_state, differentiable_inputs, forward_aliases, refuse_functorch, trainable_state
from .._loading_context import is_loading_adapter, loading_adapter
from .._mixed_batch import check_mixed_batch, mixed_batch_hooks, sub_batches
from .._peft_fixes import MonaiFriendlyTunerMixin
from .._targets import find_targets, is_conv
from .._weighted import check_weighted_adapter_args
from ..grouping import GroupSpec, from_matrix_view, matrix_shape, matrix_view, plan_groups

__all__ = ["cache_build", "ForwardScope", "TensorGroup", "TensorGroupLayer", "TensorGroupTuner", "SliceAssignment"]


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


class _Factors(torch.autograd.Function):
    """The flattened factors of a group (or its dense update ``D``) as one autograd node that *saves no tensors*.

    Its backward recomputes the factors from the group's parameters (a few small FFTs) and back-propagates through
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
            with bound_state(ctx.group, ctx.names, inputs):  # what the forward saw (functional_call)
                outs = ctx.group._compute(ctx.kind)
            pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
            if not pairs:
                return (None, None, None) + tuple(None for _ in ctx.params)
            got = torch.autograd.grad([o for o, _ in pairs], list(inputs), [g for _, g in pairs],
                                      allow_unused=True, create_graph=create_graph)
        return (None, None, None) + tuple(got)


def _device_of(value) -> torch.device:
    first = value[0]
    return first.device if isinstance(first, torch.Tensor) else first[0].device


def _to_device(value, device):
    return [v.to(device) if isinstance(v, torch.Tensor) else (v[0].to(device), v[1].to(device)) for v in value]


def _inside_init_empty_weights() -> bool:
    """True under PEFT's/accelerate's ``init_empty_weights`` (``get_peft_model(..., low_cpu_mem_usage=True)`` builds
    the tuner inside it without passing the flag on): parameters registered there land on the meta device."""
    probe = nn.Module()
    probe.register_parameter("p", nn.Parameter(torch.empty(0)))
    return probe.p.device.type == "meta"


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
        self.rank = config.r
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

    def delta_output(self, x: torch.Tensor, slice_ids: tuple[int, ...]) -> torch.Tensor:
        """``[D_k x for k in slice_ids]`` concatenated on the last axis: ``(..., n2) -> (..., m * n1)``, float32.

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
            h = (x2.to(b_flat.dtype) @ b_flat.t()).view(-1, self.n_slices, q)  # h[:, m] = B_m x
            if idx is None:
                idx = self._roll_index(slice_ids, h.device)
            hk = h[:, idx].reshape(x2.shape[0], len(slice_ids), self.n_slices * q)  # B_{k-a} x over a
            term = hk @ a_flat  # (N, m, n1)
            y = term if y is None else y + term
        return y.reshape(*lead, len(slice_ids) * self.n1)


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
        return asg.group.delta_output(x, asg.slice_ids)

    def forward(self, x: torch.Tensor, *args: Any, adapter_names: Optional[list[str]] = None,
                **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.is_conv:
            return self._conv_forward(x, args, kwargs, adapter_names)
        if adapter_names is None and not self.merged and not args and not kwargs:
            n_tokens = x.numel() // self.in_features
            dense = [n for n in self.active_adapters
                     if n in self.group_slices and self.group_slices[n].group.prefers_dense(n_tokens)]
            if dense:
                result = self._dense_forward(x, dense)
                for name in self.active_adapters:
                    if name not in dense:
                        delta = self._delta(name, x)
                        if delta is not None:
                            result = result + delta.to(result.dtype)
                return result
        result = self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            check_mixed_batch(x, adapter_names)
            for name, rows in sub_batches(adapter_names, x.device):
                delta = self._delta(name, x[rows])
                if delta is not None:
                    result[rows] = result[rows] + delta.to(result.dtype)
            return result
        if self.merged:
            return result
        for name in self.active_adapters:
            delta = self._delta(name, x)
            if delta is not None:
                result = result + delta.to(result.dtype)
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
        if isinstance(base, nn.modules.conv._ConvTransposeNd):
            output_size = args[0] if args else kwargs.get("output_size")
            n_spatial = base.weight.dim() - 2
            output_padding = base._output_padding(x, output_size, base.stride, base.padding, base.kernel_size,
                                                  n_spatial, base.dilation)
            fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[n_spatial - 1]
            return fn(x, weight, base.bias, base.stride, base.padding, output_padding, base.groups, base.dilation)
        return base._conv_forward(x, weight, base.bias)

    def _conv_forward(self, x: torch.Tensor, args: tuple, kwargs: dict,
                      adapter_names: Optional[list[str]]) -> torch.Tensor:
        if adapter_names is not None:
            # each adapter's samples run conv(x, W + D) as a batch of their own: the same numbers as a plain run
            result = self.base_layer(x, *args, **kwargs)
            check_mixed_batch(x, adapter_names)
            for name, rows in sub_batches(adapter_names, x.device):
                if name in self.group_slices:
                    result[rows] = self._adapted_conv(x[rows], [name], args, kwargs).to(result.dtype)
            return result
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        return self._adapted_conv(x, list(self.active_adapters), args, kwargs)

    def __repr__(self) -> str:
        rep = super().__repr__()
        return f"{type(self).__name__.split('.')[-1].lower()}." + rep


class TensorGroupTuner(MonaiFriendlyTunerMixin, BaseTuner):
    """``BaseTuner`` for methods whose trainable state is one set of groups per adapter.

    Subclasses set ``prefix``, ``tuner_layer_cls``, ``group_cls`` and ``groups_attr`` (``f"{prefix}groups"``).
    """

    uses_shared_state = True
    target_module_mapping: dict = {}
    group_cls: type[TensorGroup]
    groups_attr: str

    # -- containers -------------------------------------------------------------------------------------------------
    def _groups(self) -> nn.ModuleDict:
        if self.groups_attr not in self._modules:
            self.add_module(self.groups_attr, nn.ModuleDict())
        return self._modules[self.groups_attr]

    def _scope(self) -> ForwardScope:
        """The forward scope of the adapted model (hooks registered once, removed on unload)."""
        if "_forward_scope" not in self.__dict__:
            scope = ForwardScope()
            self.__dict__["_forward_scope"] = scope
            self.__dict__["_scope_hooks"] = (
                self.model.register_forward_pre_hook(self._enter_forward),
                self.model.register_forward_hook(self._exit_forward, always_call=True),
            )
        return self.__dict__["_forward_scope"]

    def _enter_forward(self, module, args) -> None:
        if module is not self.model:
            raise RuntimeError(
                f"{type(self).__name__} does not support nn.DataParallel (or any module replication): a group's state "
                "is shared by layers across the network and would be raced on by the replicas. Use "
                "torch.nn.parallel.DistributedDataParallel (one process per GPU; peft_tensor's recipes do) instead."
            )
        self.__dict__["_forward_scope"].enter()

    def _exit_forward(self, module, args, output) -> None:
        if module is self.model:
            self.__dict__["_forward_scope"].exit()

    def _remove_scope(self) -> None:
        for hook in self.__dict__.pop("_scope_hooks", ()):
            hook.remove()
        self.__dict__.pop("_forward_scope", None)

    def groups(self, adapter_name: str) -> nn.ModuleList:
        """The groups of one adapter (``nn.ModuleList`` of :class:`TensorGroup`)."""
        return self._groups()[adapter_name]

    # -- target discovery and validation (before the model is touched) ----------------------------------------
    @staticmethod
    def find_targets(model: nn.Module, config) -> list[tuple[str, nn.Module]]:
        """Matched ``(name, base layer)`` (``nn.Linear`` or a ``groups=1`` convolution) in module order; raises a
        clear error on nothing/unsupported."""
        return find_targets(model, config, convolutions=True)

    @classmethod
    def plan(cls, model: nn.Module, config) -> list[GroupSpec]:
        """Validate the config against the model and plan its groups, without touching the model."""
        targets = cls.find_targets(model, config)
        specs = plan_groups(targets, config.grouping, getattr(config, "slice_order", None) or (),
                            conv_layout=getattr(config, "conv_layout", None) or "kernel")
        for spec in specs:
            limit = min(spec.n1, spec.n2)
            if config.r > limit:
                kernel = spec.name.startswith("kernel_")  # a convolution in conv_layout="kernel" (out x in slices)
                raise RankError(
                    f"r={config.r} exceeds min(n1, n2)={limit} of group {spec.name!r} "
                    f"({spec.n_slices} x {spec.n1} x {spec.n2}, from {spec.slices[0].module_name} ...). "
                    f"Choose r <= {limit}, or leave {spec.slices[0].module_name!r} out of target_modules"
                    + (" (a convolution with few channels, e.g. the first one of a network: conv_layout='stacked' "
                       "views it as out x in*k^3, which allows a larger r)" if kernel else "") + "."
                )
        return specs

    # -- injection ----------------------------------------------------------------------------------------------
    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict=None, **kwargs) -> None:
        """Wrap the targets and build the adapter's groups.

        An adapter injected inside :func:`~._loading_context.loading_adapter` (entered by the loaders:
        ``PeftModel.from_pretrained`` / ``load_adapter``, ``peft_tensor.from_pretrained``, ``load_pretrained``) or with
        ``low_cpu_mem_usage=True`` gets *empty* groups (on the meta device with ``low_cpu_mem_usage``) that the state
        dict fills: loading never re-runs a decomposition. A loader that enters neither (``inject_adapter_in_model``
        then ``set_peft_model_state_dict`` without ``low_cpu_mem_usage``) decomposes once here. The decomposition of
        a new adapter reads the *unmerged* base weights, so adding an adapter while another one is merged gives the
        same adapter.
        """
        config = self.peft_config[adapter_name]
        specs = self.plan(model, config)
        self._check_devices(model, specs)
        # PEFT restores the trainable flags of the base model's parameters around an injection; the tuner-level group
        # state is not reachable from there, so it is snapshotted and restored here: adding or loading an adapter
        # never changes whether another adapter trains.
        snapshot = {id(p): (p, p.requires_grad) for p in self._groups().parameters()}
        super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                               low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict, **kwargs)
        low_cpu_mem_usage = low_cpu_mem_usage or _inside_init_empty_weights()
        deferred = bool(low_cpu_mem_usage or is_loading_adapter())
        scope = self._scope()
        groups = []
        for spec in specs:
            layers = {s.module_name: model.get_submodule(s.module_name) for s in spec.slices}
            sources = [(layers[s.module_name], s.row_start, s.row_end) for s in spec.slices]
            device = layers[spec.slices[0].module_name].get_base_layer().weight.device
            if deferred:
                group = self.group_cls(spec, sources, scope, config, deferred=True,
                                       device="meta" if low_cpu_mem_usage else device)
            else:
                group = self.group_cls(spec, sources, scope, config).to(device)
            groups.append(group)
            for module_name, layer in layers.items():
                ids = tuple(spec.slices_of(module_name))
                rows = tuple((spec.slices[i].row_start, spec.slices[i].row_end) for i in ids)
                n_blocks, n1, _ = matrix_shape(layer.get_base_layer(), group.conv_layout)
                if rows[0][0] != 0 or rows[-1][1] != n_blocks * n1 or any(
                    a[1] != b[0] for a, b in zip(rows, rows[1:])
                ):
                    raise RuntimeError(f"internal: slices of {module_name} do not tile its rows: {rows}")
                layer.assign(adapter_name, SliceAssignment(group, ids, rows, group.conv_layout))
        group_list = nn.ModuleList(groups)
        group_list.register_load_state_dict_post_hook(_refuse_incomplete_adapter_load)
        self._groups()[adapter_name] = group_list
        # like LoRA's modules, the new groups follow the base weights' dtype; PEFT then calls _cast_adapter_dtype,
        # which upcasts them to float32 unless autocast_adapter_dtype=False
        self._cast_groups(adapter_name, False)
        for p, flag in snapshot.values():
            p.requires_grad_(flag)
        train = adapter_name in self.active_adapters and not config.inference_mode
        for group in groups:
            for p in group.parameters():
                p.requires_grad_(train)

    def _cast_groups(self, adapter_name: str, autocast_adapter_dtype: bool) -> None:
        """As PEFT does for LoRA: adapter tensors follow the base weights' dtype, and ``autocast_adapter_dtype``
        upcasts float16/bfloat16 (and lower) to float32."""
        groups = self._groups()
        for group in (groups[adapter_name] if adapter_name in groups else ()):
            layer = group._sources[0][0]
            base_dtype = layer.get_base_layer().weight.dtype
            for t in group._state_tensors():
                if not t.is_floating_point() or t.device.type == "meta":
                    continue
                target = base_dtype if base_dtype.is_floating_point else t.dtype
                if autocast_adapter_dtype and {target, t.dtype} & {torch.float16, torch.bfloat16}:
                    target = torch.float32
                if t.dtype != target:
                    t.data = t.data.to(target)
            group._live.clear()

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        if autocast_adapter_dtype:
            self._cast_groups(adapter_name, True)

    @staticmethod
    def _check_devices(model: nn.Module, specs: list[GroupSpec]) -> None:
        """A group's layers must share one device (``device_map`` sharding that splits a group is refused)."""
        for spec in specs:
            devices = {model.get_submodule(s.module_name).weight.device for s in spec.slices}
            devices.discard(torch.device("meta"))
            if len(devices) > 1:
                raise TargetModulesError(
                    f"Group {spec.name!r} stacks layers that live on different devices ({sorted(map(str, devices))}), "
                    "e.g. from a device_map that shards the network. A group's update is one tensor on one device: "
                    "keep each group's layers on one device (put all transformer blocks on one device in the "
                    "device_map), or use grouping='by_shape' with target_modules restricted to one device's layers."
                )

    # -- mixed-adapter batches (PEFT's adapter_names=) ---------------------------------------------------------------
    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        with mixed_batch_hooks(self, self.tuner_layer_cls, kwargs.pop("adapter_names", None)):
            yield

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, self.tuner_layer_cls):
            return  # a second adapter on an already wrapped layer: assignments are added after the groups exist
        new_module = self.tuner_layer_cls(target, adapter_name)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        self._sync_requires_grad()

    def _sync_requires_grad(self) -> None:
        """Trainable flags of the tuner-level group state: active adapters train unless in inference mode."""
        for name, groups in self._groups().items():
            train = name in self.active_adapters and not self.peft_config[name].inference_mode
            for group in groups:
                for p in group.parameters():
                    p.requires_grad_(train)

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name, groups in self._groups().items():
            for group in groups:
                for p in group.parameters():
                    p.requires_grad_(name in names and not inference_mode)

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for name in names & set(self._groups().keys()):
            for group in self._groups()[name]:
                for p in group.parameters():
                    p.requires_grad_(requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name in self._groups():
            del self._groups()[adapter_name]

    def _unload_and_optionally_merge(self, *args, **kwargs):
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        self._remove_scope()
        return model

    # -- weighted combinations (PEFT's add_weighted_adapter) -------------------------------------------------------
    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: Optional[str] = None, **kwargs) -> None:
        """A new adapter whose update is exactly ``sum_i weights[i] * D_i`` of the given adapters.

        tCURLoRA: the adapters must share C and R (same rank on the same base weights); the new core is
        ``U0 + sum_i w_i s_i / s (U_i - U0_i)`` (``combination_type="linear"``, the default), ``s_i`` each adapter's
        own ``core_scale`` and ``s`` the combined adapter's (it takes the first adapter's config). LoRA-PT:
        concatenation, as LoRA's ``"cat"`` (the default): tubal rank ``sum_i r_i`` with block-diagonal cores (each
        adapter's ``factor_scale`` baked into its factors). Other combination types and
        LoRA-only arguments raise.
        """
        configs = check_weighted_adapter_args(self, adapters, weights, adapter_name, kwargs)
        layout = [(sorted(c.target_modules) if isinstance(c.target_modules, list) else c.target_modules, c.grouping,
                   list(c.slice_order), c.exclude_modules) for c in configs]
        if any(item != layout[0] for item in layout):
            raise ValueError("add_weighted_adapter needs adapters with the same target_modules, grouping, slice_order "
                             "and exclude_modules (their groups must be the same tensors).")
        config, tensors = self.group_cls.combine(
            [list(self.groups(a)) for a in adapters], [float(w) for w in weights], configs, combination_type)
        config.inference_mode = False
        self.peft_config[adapter_name] = config
        with loading_adapter():  # the new groups are filled from the combined tensors, not decomposed
            self.inject_adapter(self.model, adapter_name)
            for group, values in zip(self.groups(adapter_name), tensors):
                values = {k: v.to(group.group_shape.device) for k, v in values.items()}
                values["group_shape"] = group.group_shape.clone()
                group.load_state_dict(values, strict=True)

    # -- state dict keys: 'base_model.<prefix>groups.<adapter>.<i>.<tensor>' <-> '... <prefix>groups.<i>.<tensor>'
    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        marker = f"{cls.groups_attr}.{adapter_name}."
        if marker in key:
            return key.replace(marker, f"{cls.groups_attr}.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)

    # -- introspection ------------------------------------------------------------------------------------------
    def describe_groups(self, adapter_name: Optional[str] = None) -> list[dict]:
        """One dict per group of ``adapter_name``: name, shape ``[L, n1, n2]`` and trainable parameter count."""
        adapter_name = adapter_name or self.active_adapters[0]
        out = []
        for g in self.groups(adapter_name):
            out.append({"name": g.name, "shape": [g.n_slices, g.n1, g.n2],
                        "trainable": sum(p.numel() for p in g.parameters())})
        return out
