"""HyPS: hybrid parallel (principal SVD, mergeable) + serial (bottleneck, non-mergeable) adapters on nn.Linear.

Importing this module registers the method with PEFT as ``PeftType.HYPS`` (parameter prefix ``hyps_``).
"""

from ..._registration import register_method
from .config import SWINUNETR_HYPS_TARGETS, HyPSConfig
from .layer import HyPSLayer, Linear, principal_factors
from .model import HyPSModel

__all__ = ["HyPSConfig", "HyPSLayer", "HyPSModel", "Linear", "SWINUNETR_HYPS_TARGETS", "principal_factors"]

register_method("HYPS", HyPSConfig, HyPSModel, "hyps_")
