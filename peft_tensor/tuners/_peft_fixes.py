"""Work-arounds for PEFT behaviour that breaks on MONAI networks; shared by every peft_tensor tuner."""

from __future__ import annotations

import contextlib

from peft.utils.other import AuxiliaryTrainingWrapper


class MonaiFriendlyTunerMixin:
    """Mix into a ``BaseTuner`` subclass (before ``BaseTuner``).

    ``merge_and_unload``/``unload`` with ``modules_to_save`` naming whole blocks (e.g. UNETR's ``decoder2``) fails in
    peft 0.21: ``BaseTuner._replace_module`` copies ``child.weight`` onto the unwrapped module, and a block has no
    ``weight``. For auxiliary wrappers the unwrapped module is already complete, so it is put back as is.
    """

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        if isinstance(child, AuxiliaryTrainingWrapper):
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)


@contextlib.contextmanager
def mixed_batch_hooks(tuner, layer_cls, adapter_names):
    """PEFT's ``adapter_names=`` mixed batches, as LoRA does them: checks at the call, then a pre-forward hook on each
    adapted layer passes the per-sample adapter names down. ``"__base__"`` selects the base model for a sample."""
    if adapter_names is None:
        yield
        return
    if tuner.training:
        raise ValueError("Cannot pass `adapter_names` when the model is in training mode: mixed-adapter batches are "
                         "for inference. Call model.eval() first.")
    if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
        raise ValueError("adapter_names must be a list of adapter names, one per sample ('__base__' for none).")
    unknown = sorted(set(adapter_names) - set(tuner.peft_config) - {"__base__"})
    if unknown:
        raise ValueError(f"adapter_names names unknown adapters {unknown}; this model has {sorted(tuner.peft_config)} "
                         "(and '__base__' for the base model).")
    layers = [m for m in tuner.model.modules() if isinstance(m, layer_cls)]
    if any(m.merged for m in layers):
        raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` "
                         "first.")

    def pre_forward(module, args, kwargs):
        kwargs["adapter_names"] = adapter_names
        return args, kwargs

    handles = [m.register_forward_pre_hook(pre_forward, with_kwargs=True) for m in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
