"""HyPS: hybrid parallel (principal SVD, mergeable) + serial (bottleneck, non-mergeable) adapters on nn.Linear and on
convolutions (nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d/3d with groups=1) (arXiv 2409.00884; convolutions are ours).

Importing this package registers the method (PEFT's ``PeftType.HYPS``, parameter prefix ``hyps_``) through
:func:`peft_tensor.registry.register`.
"""

from ...registry import register
from .config import SWINUNETR_HYPS_TARGETS, HyPSConfig
from .layer import CONV_TYPES, Conv, HyPSLayer, Linear, principal_factors
from .model import HyPSModel

__all__ = ["CONV_TYPES", "Conv", "HyPSConfig", "HyPSLayer", "HyPSModel", "Linear", "SWINUNETR_HYPS_TARGETS",
           "principal_factors"]

register("hyps", peft_type="HYPS", config_cls=HyPSConfig, model_cls=HyPSModel, prefix="hyps_",
         summary="HyPS: parallel principal-SVD + serial bottleneck adapters (SwinUNETR)", paper="arXiv 2409.00884",
         lr=0.1)  # the factors' rate from the learning-rate sweep (docs/methods.md, "Learning rates")
