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
* :class:`TensorGroupLayer` -- the wrapped ``nn.Linear``. It knows its group, its slice indices and (for a fused
  qkv weight) their row ranges, and adds ``D_k x`` without ever materialising ``D``:
  ``D_k x = sum_a A_a (B_{(k-a) mod L} x)``, i.e. one ``(N, n2) @ (n2, L q)`` product shared by all of the layer's
  slices and one ``(N, L q) @ (L q, n1)`` product per slice. Merging materialises ``D`` through the FFT.
  (Materialising ``D`` every step instead was measured ~10x slower on CPU: a 28 M-entry FFT and its gradient.)
* :class:`TensorGroupTuner` -- the ``BaseTuner``: finds and validates targets *before* touching the model, plans
  the groups, wraps the layers, builds the groups, keeps trainable flags and the forward counter in sync, and maps
  state-dict keys so adapters save and load under any adapter name.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge, check_target_module_exists
from torch import nn

from ..algebra import from_fourier, t_product_fourier, to_fourier
from ..errors import AdapterLoadError, MergeError, RankError, TargetModulesError
from ._peft_fixes import MonaiFriendlyTunerMixin
from .grouping import GroupSpec, plan_groups

__all__ = ["ForwardClock", "TensorGroup", "TensorGroupLayer", "TensorGroupTuner", "SliceAssignment"]


class ForwardClock:
    """Counts forward passes of the adapted model; a pre-hook on the model ticks it."""

    def __init__(self) -> None:
        self.epoch = 0

    def tick(self, *_: Any) -> None:
        self.epoch += 1


@dataclass
class SliceAssignment:
    """What a wrapped layer needs to know about one adapter: its group and its slices (row order)."""

    group: "TensorGroup"
    slice_ids: tuple[int, ...]
    row_ranges: tuple[tuple[int, int], ...]


class TensorGroup(nn.Module):
    """State of one group tensor for one adapter. Subclasses define the factors.

    Subclass contract: ``_init_from_weight(W)`` creates parameters/buffers from the stacked weight ``W``
    ``(L, n1, n2)`` (float32); ``factors()`` returns a list of real pairs ``A_i (L, n1, q_i)``, ``B_i (L, q_i, n2)``
    with ``D = sum_i A_i * B_i`` (a pair that needs no gradient is cheaper in the backward pass);
    ``refresh_frozen()`` (optional) rebuilds non-persistent buffers after a state dict was loaded.
    """

    def __init__(self, spec: GroupSpec, sources: list, clock: ForwardClock, config) -> None:
        super().__init__()
        self.name = spec.name
        self.n_slices, self.n1, self.n2 = spec.n_slices, spec.n1, spec.n2
        self.rank = config.r
        # unregistered references: the layers are owned by the base model, the clock by the tuner
        self.__dict__["_sources"] = sources  # [(layer, row_start, row_end)] in slice order
        self.__dict__["_clock"] = clock
        self.__dict__["_cache"] = {}
        self._roll = {}
        # saved with the adapter so a load onto a different network is refused by value, not only by shape
        self.register_buffer("group_shape", torch.tensor([self.n_slices, self.n1, self.n2], dtype=torch.int64))
        with torch.no_grad():
            self._init_from_weight(self.stacked_weight(), config)

    # -- construction ------------------------------------------------------------------------------------------
    def stacked_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The group tensor ``(L, n1, n2)`` gathered from the (unmerged) base weights."""
        rows = [layer.get_base_layer().weight[r0:r1].detach().to(dtype) for layer, r0, r1 in self._sources]
        return torch.stack(rows, dim=0)

    @staticmethod
    def expected_shapes(spec: GroupSpec, config) -> dict[str, tuple[int, ...]]:  # pragma: no cover - abstract
        """Shapes of the saved tensors of a group planned as ``spec`` (checked before loading an adapter)."""
        raise NotImplementedError

    def _init_from_weight(self, weight: torch.Tensor, config) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def refresh_frozen(self) -> None:
        """Rebuild derived, non-persistent buffers (called after loading a state dict)."""

    def factors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "group_shape")
        if saved is not None and saved.tolist() != self.group_shape.tolist():
            raise AdapterLoadError(
                f"Group {self.name!r} of this adapter was saved as a {' x '.join(map(str, saved.tolist()))} tensor, but "
                f"this base model gives {self.n_slices} x {self.n1} x {self.n2}: the adapter belongs to another network. "
                "Load it onto the base model it was trained on."
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if any(k.startswith(prefix) for k in state_dict):
            self.refresh_frozen()
        self._cache.clear()

    # -- the per-forward cache -----------------------------------------------------------------------------------
    def _cache_key(self) -> tuple:
        grad = torch.is_grad_enabled()
        tensors = tuple((t._version, t.data_ptr(), t.requires_grad) for t in self._state_tensors())
        return (grad, torch.is_inference_mode_enabled(), self._clock.epoch if grad else None, tensors)

    def _state_tensors(self):
        yield from self.parameters(recurse=False)
        yield from self.buffers(recurse=False)

    def _cached(self, kind: str, compute):
        key = self._cache_key()
        hit = self._cache.get(kind)
        if hit is not None and hit[0] == key:
            return hit[1]
        device_type = next(self._state_tensors()).device.type
        with torch.autocast(device_type=device_type, enabled=False):
            value = compute()
        self._cache[kind] = (key, value)
        return value

    def _flat_factors(self):
        """Per term ``(A_flat (L q, n1), B_flat (L q, n2), q)``: rows ``(a, j)`` of A_flat hold ``A_a[:, j]``."""
        flat = []
        for a, b in self.factors():
            q = a.shape[-1]
            flat.append((a.permute(0, 2, 1).reshape(self.n_slices * q, self.n1), b.reshape(self.n_slices * q, self.n2), q))
        return flat

    def dense_delta(self) -> torch.Tensor:
        """The full update tensor ``D = sum_i A_i * B_i`` ``(L, n1, n2)``, float32 (used for merging)."""

        def compute():
            d_hat = sum(t_product_fourier(to_fourier(a), to_fourier(b)) for a, b in self.factors())
            return from_fourier(d_hat, self.n_slices)

        return self._cached("dense", compute)

    def _roll_index(self, slice_ids: tuple[int, ...], device) -> torch.Tensor:
        idx = self._roll.get((slice_ids, device))
        if idx is None:
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
        terms = self._cached("factored", self._flat_factors)
        idx = None
        y = None
        for a_flat, b_flat, q in terms:
            h = (x2.to(b_flat.dtype) @ b_flat.t()).view(-1, self.n_slices, q)  # h[:, m] = B_m x
            if idx is None:
                idx = self._roll_index(slice_ids, h.device)
            hk = h[:, idx].reshape(x2.shape[0], len(slice_ids), self.n_slices * q)  # B_{k-a} x over a
            term = hk @ a_flat  # (N, m, n1)
            y = term if y is None else y + term
        return y.reshape(*lead, len(slice_ids) * self.n1)


class TensorGroupLayer(nn.Module, BaseTunerLayer):
    """A targeted ``nn.Linear`` whose weight rows are slices of group tensors (one assignment per adapter).

    The trainable state lives on the tuner (once per adapter), so this layer registers no adapter parameters;
    it holds plain references to its groups.
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
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.kwargs = kwargs

    def assign(self, adapter_name: str, assignment: SliceAssignment) -> None:
        self.group_slices[adapter_name] = assignment

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``out x in`` update of this layer's weight for one adapter (float32)."""
        asg = self.group_slices[adapter_name]
        dense = asg.group.dense_delta()
        return dense[list(asg.slice_ids)].reshape(-1, asg.group.n2)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.group_slices:
                continue
            delta = self.get_delta_weight(name).to(base.weight.device)
            if safe_merge:
                merged = base.weight.data.float() + delta
                if not torch.isfinite(merged).all():
                    raise MergeError(
                        f"Merging adapter {name!r} would put NaN/inf into {type(base).__name__} weights; the adapter "
                        "seems broken (diverged training?). Nothing was merged into this layer."
                    )
                base.weight.data = merged.to(base.weight.dtype)
            else:
                base.weight.data += delta.to(base.weight.dtype)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.group_slices:
                base.weight.data -= self.get_delta_weight(name).to(base.weight.device, base.weight.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            asg = self.group_slices.get(name)
            if asg is None:
                continue
            result = result + asg.group.delta_output(x, asg.slice_ids).to(result.dtype)
        return result

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

    def _clock(self) -> ForwardClock:
        if "_forward_clock" not in self.__dict__:
            self.__dict__["_forward_clock"] = ForwardClock()
            self.__dict__["_clock_hook"] = self.model.register_forward_pre_hook(self._forward_clock.tick)
        return self._forward_clock

    def _remove_clock(self) -> None:
        hook = self.__dict__.pop("_clock_hook", None)
        if hook is not None:
            hook.remove()
        self.__dict__.pop("_forward_clock", None)

    def groups(self, adapter_name: str) -> nn.ModuleList:
        """The groups of one adapter (``nn.ModuleList`` of :class:`TensorGroup`)."""
        return self._groups()[adapter_name]

    # -- target discovery and validation (before the model is touched) ----------------------------------------
    @staticmethod
    def find_targets(model: nn.Module, config) -> list[tuple[str, nn.Module]]:
        """Matched ``(name, base nn.Linear)`` in module order; raises a clear error on nothing/unsupported."""
        matches, unsupported, linears = [], [], []
        for name, module in model.named_modules():
            parts = name.split(".")
            if not name or {"base_layer", "modules_to_save", "original_module"} & set(parts):
                continue
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            if isinstance(base, nn.Linear):
                linears.append(name)
            hit = check_target_module_exists(config, name)
            if not hit or type(hit).__name__ == "_ExcludedModule":
                continue
            if isinstance(base, nn.Linear):
                matches.append((name, base))
            else:
                unsupported.append(f"{name} ({type(base).__name__})")
        method = type(config).__name__.replace("Config", "")
        if unsupported:
            raise TargetModulesError(
                f"{method} adapts nn.Linear layers only, but target_modules={config.target_modules!r} also matched "
                f"{', '.join(unsupported[:5])}{' ...' if len(unsupported) > 5 else ''}. Narrow target_modules (e.g. "
                "'attn.proj' instead of 'proj') or add those modules to exclude_modules."
            )
        if not matches:
            sample = ", ".join(linears[:8]) + (" ..." if len(linears) > 8 else "")
            raise TargetModulesError(
                f"target_modules={config.target_modules!r} matched no module of {type(model).__name__}. "
                f"Its nn.Linear layers are: {sample or 'none'}. Names match as suffixes ('attn.qkv') or, for a "
                "string, as a full regex."
            )
        return matches

    @classmethod
    def plan(cls, model: nn.Module, config) -> list[GroupSpec]:
        """Validate the config against the model and plan its groups, without touching the model."""
        targets = cls.find_targets(model, config)
        specs = plan_groups(targets, config.grouping, getattr(config, "slice_order", None) or ())
        for spec in specs:
            limit = min(spec.n1, spec.n2)
            if config.r > limit:
                raise RankError(
                    f"r={config.r} exceeds min(n1, n2)={limit} of group {spec.name!r} "
                    f"({spec.n_slices} x {spec.n1} x {spec.n2}, from {spec.slices[0].module_name} ...). "
                    f"Choose r <= {limit}."
                )
        return specs

    # -- injection ----------------------------------------------------------------------------------------------
    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict=None, **kwargs) -> None:
        config = self.peft_config[adapter_name]
        specs = self.plan(model, config)
        super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                               low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict, **kwargs)
        clock = self._clock()
        groups = []
        for spec in specs:
            layers = {s.module_name: model.get_submodule(s.module_name) for s in spec.slices}
            sources = [(layers[s.module_name], s.row_start, s.row_end) for s in spec.slices]
            group = self.group_cls(spec, sources, clock, config)
            device = layers[spec.slices[0].module_name].get_base_layer().weight.device
            groups.append(group.to(device))
            for module_name, layer in layers.items():
                ids = tuple(spec.slices_of(module_name))
                rows = tuple((spec.slices[i].row_start, spec.slices[i].row_end) for i in ids)
                if rows[0][0] != 0 or rows[-1][1] != layer.out_features or any(
                    a[1] != b[0] for a, b in zip(rows, rows[1:])
                ):
                    raise RuntimeError(f"internal: slices of {module_name} do not tile its rows: {rows}")
                layer.assign(adapter_name, SliceAssignment(group, ids, rows))
        self._groups()[adapter_name] = nn.ModuleList(groups)
        self._sync_requires_grad()

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
        self._remove_clock()
        return model

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
