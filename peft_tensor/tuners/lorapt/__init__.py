"""LoRA-PT: the principal tensor singular components (t-SVD) of stacked weights train, the residual stays frozen
(arXiv 2407.11292, AIIM 2025).

Importing this package registers the method (PEFT's ``PeftType.LORAPT``, parameter prefix ``lorapt_``) through
:func:`peft_tensor.registry.register`.
"""

from ...registry import register
from .config import LoraPTConfig
from .layer import LoraPTGroup, LoraPTLayer
from .model import LoraPTModel

__all__ = ["LoraPTConfig", "LoraPTGroup", "LoraPTLayer", "LoraPTModel"]

register("lorapt", peft_type="LORAPT", config_cls=LoraPTConfig, model_cls=LoraPTModel, prefix="lorapt_",
         summary="LoRA-PT: principal t-SVD components train, residual frozen", paper="arXiv 2407.11292 (AIIM 2025)",
         # the recipes' form: r=32, one factor scale per principal component (factor_scale='per_component'), the
         # core S at a fifth of the factors' gain (core_gain); the paper's form (factor_scale 1.0, core_gain 1.0) is
         # finetune_unetr_lorapt (docs/methods.md#lora-pts-recipe-form)
         arm_defaults={"r": 32, "core_gain": 0.2, "factor_scale": "per_component"},
         full_arm_defaults={"r": 2},  # r=32 exceeds the decoder convs' channels; the whole-network arm as before
         # the factors do not move at the recipes' 3e-3; per component every column moves the weights as much as the
         # principal one, so the rate is lower than 'auto''s (an arm that asks for 'auto' gets that one's 0.3)
         lr=0.1, lr_by={"factor_scale": {"auto": 0.3}}, full_lr=0.3,
         # coupled weight decay pulls U, S, V to zero: it removes the principal part (docs/methods.md#weight-decay)
         weight_decay=0.0)
