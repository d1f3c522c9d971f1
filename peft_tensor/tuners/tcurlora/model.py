from __future__ import annotations

from ..tensor_group import TensorGroupTuner
from .layer import TCURLoraGroup, TCURLoraLayer


class TCURLoraModel(TensorGroupTuner):
    """tCURLoRA tuner: ``get_peft_model(model, TCURLoraConfig(...))`` builds it.

    Per adapter it holds one :class:`TCURLoraGroup` per group tensor (in ``tcurlora_groups[adapter]``); the wrapped
    ``nn.Linear`` layers reference their group and slices.
    """

    prefix = "tcurlora_"
    tuner_layer_cls = TCURLoraLayer
    group_cls = TCURLoraGroup
    groups_attr = "tcurlora_groups"
