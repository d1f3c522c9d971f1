"""tCURLoRA: a tensor CUR of stacked weights whose small core ``U`` trains (arXiv 2501.02227, MICCAI 2025).

Importing this package registers the method (PEFT's ``PeftType.TCURLORA``, parameter prefix ``tcurlora_``) through
:func:`peft_tensor.registry.register`.
"""

from ...registry import register
from .config import TCURLoraConfig
from .layer import TCURLoraGroup, TCURLoraLayer
from .model import TCURLoraModel

__all__ = ["TCURLoraConfig", "TCURLoraGroup", "TCURLoraLayer", "TCURLoraModel"]

register("tcurlora", peft_type="TCURLORA", config_cls=TCURLoraConfig, model_cls=TCURLoraModel, prefix="tcurlora_",
         summary="tCURLoRA: the r x r x L core U of a tensor CUR of stacked weights trains",
         paper="arXiv 2501.02227 (MICCAI 2025)",
         # the recipes' rank: r=8 (the paper's, TCURLoraConfig's default) is stuck at the frozen network's Dice on
         # some backbones of the learning panel, r=16 learns on every one (docs/methods.md#weight-decay)
         arm_defaults={"r": 16}, full_arm_defaults={"r": 8},  # tcurlora_full: decoder convs too, measured at r=8
         lr=0.3,  # with core_scale="auto"; the core does not move at the recipes' 3e-3 (docs/methods.md)
         # tcurlora_full (cores on the decoder convolutions too) is unstable at 0.3 and trains at 0.03
         # (docs/convolutions.md)
         full_lr=0.03,
         # coupled weight decay pulls the core to zero, i.e. the update to -s C U0 R: it removes the weights' CUR
         # part (docs/methods.md#weight-decay)
         weight_decay=0.0)
