"""The tuner: :class:`TensorGroupTuner`, the ``BaseTuner`` of the cross-layer methods. It finds and validates targets
*before* touching the model, plans the groups, wraps the layers, builds the groups, keeps trainable flags and the
forward counter in sync, and maps state-dict keys so adapters save and load under any adapter name."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn

from ..._peft_compat import BaseTuner, MonaiFriendlyTunerMixin
from ...errors import TargetModulesError
from .._loading_context import inside_init_empty_weights as _inside_init_empty_weights
from .._loading_context import is_loading_adapter, loading_adapter
from .._mixed_batch import mixed_batch_hooks
from .._ranks import RankPlan, cap_warning, resolve_rank_cap, resolve_ranks
from .._targets import find_targets, prepare_targets
from .._weighted import check_weighted_adapter_args
from ..grouping import GroupSpec, matrix_shape, plan_groups
from .state import ForwardScope, SliceAssignment, TensorGroup, _refuse_incomplete_adapter_load

__all__ = ["TensorGroupTuner"]


class TensorGroupTuner(MonaiFriendlyTunerMixin, BaseTuner):
    """``BaseTuner`` for methods whose trainable state is one set of groups per adapter.

    Subclasses set ``prefix``, ``tuner_layer_cls``, ``group_cls`` and ``groups_attr`` (``f"{prefix}groups"``).
    The private ``BaseTuner`` hooks it overrides are PEFT internals, listed in
    :data:`peft_tensor._peft_compat.TUNER_HOOKS` (and checked by ``tests/test_peft_compat.py``).
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
    def _prepare_adapter_config(self, peft_config, model_config: dict):
        """``target_modules=None``: the network's preset (:func:`~.._targets.prepare_targets`), where PEFT fills
        LoRA's defaults for transformers models."""
        return prepare_targets(self.model, peft_config, self._rank_limit(peft_config))

    @staticmethod
    def _rank_limit(config):
        """The largest r a layer allows as its own group (the one-layer case of ``min(n1, n2)``)."""
        layout = getattr(config, "conv_layout", None) or "kernel"
        return lambda layer: min(matrix_shape(layer, layout)[1:])

    @classmethod
    def find_targets(cls, model: nn.Module, config) -> list[tuple[str, nn.Module]]:
        """Matched ``(name, base layer)`` (``nn.Linear`` or a ``groups=1`` convolution) in module order; raises a
        clear error on nothing/unsupported."""
        return find_targets(model, config, convolutions=True, rank_limit=cls._rank_limit(config))

    @classmethod
    def plan(cls, model: nn.Module, config) -> list[GroupSpec]:
        """Validate the config against the model and plan its groups, without touching the model."""
        targets = cls.find_targets(model, config)
        specs = plan_groups(targets, config.grouping, getattr(config, "slice_order", None) or (),
                            conv_layout=getattr(config, "conv_layout", None) or "kernel")
        units = []
        for spec in specs:
            members = spec.members
            kernel = spec.name.startswith("kernel_")  # a convolution in conv_layout="kernel" (out x in slices)
            hint = (" (a convolution with few channels, e.g. the first one of a network: conv_layout='stacked' views "
                    "it as out x in*k^3, which allows a larger r)") if kernel else ""
            what = f"group {spec.name!r} ({spec.n_slices} x {spec.n1} x {spec.n2}, from {members[0]} ...)"
            units.append((spec.name, members, min(spec.n1, spec.n2), what, hint))
        for spec, resolved in zip(specs, resolve_ranks(config, units)):
            spec.rank, spec.requested_rank = resolved.rank, resolved.requested
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
        prepare_targets(model, config, self._rank_limit(config), check_partial=False)  # PEFT's call warns
        specs = self.plan(model, config)
        config.rank_cap = resolve_rank_cap(config)  # recorded: the saved config loads with the same ranks
        if not is_loading_adapter():
            cap_warning(config, [RankPlan(s.name, s.rank, s.requested_rank, min(s.n1, s.n2)) for s in specs])
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
        """One dict per group of ``adapter_name``: name, shape ``[L, n1, n2]``, rank and trainable parameter count."""
        adapter_name = adapter_name or self.active_adapters[0]
        out = []
        for g in self.groups(adapter_name):
            out.append({"name": g.name, "shape": [g.n_slices, g.n1, g.n2], "rank": g.rank,
                        "trainable": sum(p.numel() for p in g.parameters())})
        return out
