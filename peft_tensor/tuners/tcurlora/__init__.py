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
         paper="arXiv 2501.02227 (MICCAI 2025)", arm_defaults={"r": 8},
         lr=0.3,  # with core_scale="auto"; the core does not move at the recipes' 3e-3 (docs/methods.md)
         # tcurlora_full (cores on the decoder convolutions too) is unstable at 0.3 and trains at 0.03
         # (docs/convolutions.md)
         # factors keep optim.weight_decay: without it the core learns on the pretrain_cpu backbone but loses on the
         # demo's (docs/methods.md#weight-decay); arm.method_weight_decay=0 selects it
         full_lr=0.03)
