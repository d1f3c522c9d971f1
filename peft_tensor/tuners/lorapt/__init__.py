from ..._registration import register_method
from .config import LoraPTConfig
from .layer import LoraPTGroup, LoraPTLayer
from .model import LoraPTModel

register_method("LORAPT", LoraPTConfig, LoraPTModel, prefix="lorapt_")

__all__ = ["LoraPTConfig", "LoraPTGroup", "LoraPTLayer", "LoraPTModel"]
