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
         # the recipes' form: r=16 in the orthonormal core basis at 2.0. The paper's form (r=8, basis 'paper', the
         # config's own defaults) stalls or saturates below PEFT LoRA on the learning panel; r=16 alone learns more,
         # the orthonormal coordinates at a rate for them most (docs/methods.md#tcurloras-recipe-form)
         arm_defaults={"r": 16, "basis": "orthonormal"},
         # on UNETR, the paper's grouping (one attention tensor of q, k, v, out_proj slices per block, MLP up, MLP
         # down): each slice's factors are 48 r wide instead of 12 r, about twice the adapter's matmuls of the shape
         # grouping; its panel evidence and step time: docs/methods.md#tcurloras-recipe-form
         backbone_arm_defaults={"unetr": {"grouping": "paper"}},
         full_arm_defaults={"r": 8},  # tcurlora_full: decoder convs too, measured at r=8 in the paper basis
         lr=2.0,  # of the orthonormal core (core_scale="auto"); the core does not move at the recipes' 3e-3
         lr_by={"basis": {"paper": 0.3}},  # an arm that asks for the paper's core basis gets its swept rate
         # tcurlora_full (cores on the decoder convolutions too) is unstable at 0.3 and trains at 0.03
         # (docs/convolutions.md)
         full_lr=0.03,
         # coupled weight decay pulls the paper's core to zero, i.e. the update to -s C U0 R: it removes the weights'
         # CUR part (docs/methods.md#weight-decay)
         weight_decay=0.0)
