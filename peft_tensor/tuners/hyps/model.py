"""The HyPS tuner: decides which layers to wrap and enforces HyPS's rules for merging."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn

from ..._peft_compat import BaseTuner, BaseTunerLayer, MonaiFriendlyTunerMixin
from ...errors import MergeError, TargetModulesError
from .._loading_context import is_loading_adapter, loading_adapter
from .._mixed_batch import mixed_batch_hooks
from .._ranks import cap_warning, rank_of, resolve_rank_cap, resolve_ranks
from .._targets import find_targets, prepare_targets
from .._weighted import check_weighted_adapter_args
from .config import HyPSConfig
from .layer import (
    CONV_TYPES,
    Conv,
    HyPSLayer,
    Linear,
    describe_matrix,
    matrix_shape,
    refuse_partial_load,
    serial_merge_message,
)

__all__ = ["HyPSModel"]

class HyPSModel(MonaiFriendlyTunerMixin, BaseTuner):
    """Hybrid parallel + serial adaptation (HyPS, arXiv 2409.00884) of every targeted ``nn.Linear`` and ``groups=1``
    convolution (``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``; see [`Conv`] for the kernel's matricisation).

    See [`HyPSConfig`] for the maths. ``target_modules=None`` takes the network's preset
    (:func:`peft_tensor.preset_for`): [`SWINUNETR_HYPS_TARGETS`] on SwinUNETR (the paper's set), the transformer
    blocks' Linear layers on UNETR / ViT, every convolution with a kernel larger than 1 on the CNNs (SegResNet, UNet,
    DynUNet, BasicUNet, AttentionUnet; docs/convolutions.md).

    Merging: only the parallel branch is mergeable (exactly, ``W += A B - A0 B0``). Merging an adapter that has a
    serial branch raises [`MergeError`] before any weight changes; with ``serial=False``, ``merge_and_unload()``
    returns the plain base network.

    The private ``BaseTuner`` hooks it overrides are PEFT internals, listed in
    :data:`peft_tensor._peft_compat.TUNER_HOOKS` (and checked by ``tests/test_peft_compat.py``).
    """

    prefix: str = "hyps_"
    tuner_layer_cls = HyPSLayer
    target_module_mapping: dict = {}

    # ------------------------------------------------------------------------------------------------- injection

    def _prepare_adapter_config(self, peft_config: HyPSConfig, model_config: dict) -> HyPSConfig:
        """``target_modules=None``: the network's preset (:func:`~.._targets.prepare_targets`), where PEFT fills
        LoRA's defaults for transformers models."""
        return prepare_targets(self.model, peft_config, self._rank_limit(peft_config))

    @staticmethod
    def _rank_limit(config: HyPSConfig):
        """The largest r of a layer's parallel branch (``None``: no parallel branch, any r)."""
        return (lambda layer: min(matrix_shape(layer))) if config.parallel else None

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        # Validate every match before PEFT starts replacing modules, so bad input never leaves a half-wrapped model.
        config = self.peft_config[adapter_name]
        prepare_targets(model, config, self._rank_limit(config), check_partial=False)  # PEFT's call warns
        if state_dict is None:
            self._check_targets(model, self.peft_config[adapter_name])
        if refuse_partial_load not in self._load_state_dict_post_hooks.values():
            # a file that fills an adapter on some layers must fill all of them (a layer's own check sees one layer)
            self.register_load_state_dict_post_hook(refuse_partial_load)
        super().inject_adapter(
            model,
            adapter_name,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
            state_dict=state_dict,
        )

    def _check_targets(self, model: nn.Module, config: HyPSConfig) -> None:
        """Every layer's rank (``r``, ``rank_pattern``, ``rank_cap``) fits its matrix, else a RankError; with
        ``rank_cap=True`` one warning names the layers whose rank was lowered."""
        units = []
        for name, base in find_targets(model, config, rank_limit=self._rank_limit(config)):
            rows, cols = matrix_shape(base)  # (out, in) for a Linear
            units.append((name, [name], min(rows, cols), f"the {describe_matrix(base)} {name!r} ({rows} x {cols})",
                          ""))
        if not config.parallel:  # r binds the parallel branch only
            config.rank_cap = resolve_rank_cap(config)  # recorded: the saved config loads with the same ranks
            return
        plans = resolve_ranks(config, units, unit="layer", bound="min(out, in)")
        config.rank_cap = resolve_rank_cap(config)
        if not is_loading_adapter():
            cap_warning(config, plans, unit="layer", bound="min(out, in)")

    @staticmethod
    def layer_rank(config: HyPSConfig, name: str, base: nn.Module) -> int:
        """The rank of layer ``name``: ``rank_pattern`` (PEFT LoRA's matching) or ``r``, lowered to ``min(out, in)``
        of its matrix under ``rank_cap=True`` (the bound is refused earlier, in ``_check_targets``, otherwise)."""
        rank = rank_of(config, name)
        return min(rank, *matrix_shape(base)) if resolve_rank_cap(config) else rank

    def _create_and_replace(
        self,
        hyps_config: HyPSConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs,
    ) -> None:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        r = self.layer_rank(hyps_config, current_key, base)
        if isinstance(target, HyPSLayer):
            target.update_layer(adapter_name, hyps_config, layer_name=current_key, r=r)
            return
        if isinstance(base, nn.Linear):
            new_module = Linear(target, adapter_name, hyps_config, layer_name=current_key, r=r)
        elif isinstance(base, CONV_TYPES) and base.groups == 1:
            new_module = Conv(target, adapter_name, hyps_config, layer_name=current_key, r=r)
        else:
            raise TargetModulesError(
                f"HyPS adapts nn.Linear layers and groups=1 convolutions only; {current_key!r} is a "
                f"{type(base).__name__}{f' with groups={base.groups}' if isinstance(base, CONV_TYPES) else ''}. "
                "Narrow target_modules."
            )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    # ------------------------------------------------------------------------------------- mixed-adapter batches

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        with mixed_batch_hooks(self, HyPSLayer, kwargs.pop("adapter_names", None)):
            yield

    # ------------------------------------------------------------------------------------------- weighted adapters

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: Optional[str] = None, **kwargs) -> None:
        """A parallel-only adapter whose update is exactly ``sum_i w_i (A_i B_i - A0_i B0_i)``: concatenation, as
        LoRA's ``"cat"`` (rank ``sum_i r_i``). Serial branches are non-linear and cannot be combined: refused."""
        configs = check_weighted_adapter_args(self, adapters, weights, adapter_name, kwargs)
        if combination_type not in (None, "cat"):
            raise ValueError(f"HyPS combines parallel branches exactly by concatenation (combination_type='cat'); "
                             f"{combination_type!r} is not supported.")
        serial = [a for a, c in zip(adapters, configs) if c.serial]
        if serial:
            raise MergeError(
                f"HyPS adapters {serial} have a serial branch (Up(ReLU(Down(h)))), which is non-linear: a weighted "
                "sum of such adapters is not an adapter of the same form. Combine parallel-only adapters "
                "(HyPSConfig(serial=False)).")
        if any(c.parallel is False for c in configs):
            raise ValueError("add_weighted_adapter needs adapters with a parallel branch.")
        import copy
        import re

        config = copy.deepcopy(configs[0])
        config.r = sum(c.r for c in configs)
        config.inference_mode = False
        # per-layer ranks (rank_pattern, rank_cap) add up layer by layer: the combined config names each layer whose
        # sum is not its r (anchored keys, PEFT's matching) and caps nothing
        config.rank_cap = False
        config.rank_pattern = {}
        for name, module in self.model.named_modules():
            if isinstance(module, HyPSLayer) and all(a in module.hyps_r for a in adapters):
                rank = sum(module.hyps_r[a] for a in adapters)
                if rank > min(module.matrix_shape):
                    raise ValueError(
                        f"HyPS combines parallel branches by concatenation, so {name!r} would need rank "
                        f"{' + '.join(str(module.hyps_r[a]) for a in adapters)} = {rank}, above what its "
                        f"{module.matrix_shape[0]} x {module.matrix_shape[1]} matrix allows "
                        f"({min(module.matrix_shape)}): combine fewer adapters, or adapters of lower rank there "
                        "(rank_pattern).")
                if rank != config.r:
                    config.rank_pattern["^" + re.escape(name)] = rank
        self.peft_config[adapter_name] = config
        with loading_adapter():  # built empty (no SVD): its factors are the combined ones below
            self.inject_adapter(self.model, adapter_name)
        with torch.no_grad():
            for module in self.model.modules():
                if not isinstance(module, HyPSLayer) or adapter_name not in module.hyps_A:
                    continue
                present = [(a, float(w)) for a, w in zip(adapters, weights) if a in module.hyps_A]
                if [a for a, _ in present] != list(adapters):
                    raise ValueError("add_weighted_adapter needs adapters that target the same layers.")
                for a, _ in present:
                    module._materialize(a)
                module.hyps_pending.pop(adapter_name, None)
                module.hyps_A[adapter_name].data = torch.cat([w * module.hyps_A[a] for a, w in present], dim=1)
                module.hyps_B[adapter_name].data = torch.cat([module.hyps_B[a] for a, _ in present], dim=0)
                module.hyps_A0[adapter_name] = torch.cat([w * module.hyps_A0[a] for a, w in present], dim=1)
                module.hyps_B0[adapter_name] = torch.cat([module.hyps_B0[a] for a, _ in present], dim=0)

    # --------------------------------------------------------------------------------------------------- merging

    def _check_mergeable(self, adapter_names: Optional[list[str]]) -> None:
        names = self.active_adapters if adapter_names is None else adapter_names
        for name in names:
            config = self.peft_config.get(name)
            if config is not None and config.serial:
                raise MergeError(serial_merge_message(name))

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        self._check_mergeable(adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Optional[list[str]] = None,
    ):
        if merge:
            self._check_mergeable(adapter_names)
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
