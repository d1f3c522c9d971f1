from __future__ import annotations

from ..tensor_group import TensorGroupTuner
from .layer import LoraPTGroup, LoraPTLayer


class LoraPTModel(TensorGroupTuner):
    """LoRA-PT tuner: ``get_peft_model(model, LoraPTConfig(...))`` builds it (groups in ``lorapt_groups``)."""

    prefix = "lorapt_"
    tuner_layer_cls = LoraPTLayer
    group_cls = LoraPTGroup
    groups_attr = "lorapt_groups"
