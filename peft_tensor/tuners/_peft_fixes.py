"""Work-arounds for PEFT behaviour that breaks on MONAI networks; shared by every peft_tensor tuner."""

from __future__ import annotations

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
