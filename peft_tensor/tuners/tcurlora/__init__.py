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
         lr=0.3)  # core_scale="auto"; benchmarks/results/lr_sweep_cpu.md: best at 0.3, frozen at the recipes' 3e-3
