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
         lr=0.3,  # core_scale="auto"; benchmarks/results/lr_sweep_cpu.md: best at 0.3, frozen at the recipes' 3e-3
         # tcurlora_full (cores on the decoder convs too): 0.3 is unstable (Dice 0.11 / 0.43 over 2 seeds at N=10),
         # 0.03 reaches 0.50 / 0.53 / 0.47 at N=5/10/20 (benchmarks/results/fewshot_conv_cpu{,_lr}.md)
         full_lr=0.03)
