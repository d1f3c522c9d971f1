from ..._registration import register_method
from .config import TCURLoraConfig
from .layer import TCURLoraGroup, TCURLoraLayer
from .model import TCURLoraModel

register_method("TCURLORA", TCURLoraConfig, TCURLoraModel, prefix="tcurlora_")

__all__ = ["TCURLoraConfig", "TCURLoraGroup", "TCURLoraLayer", "TCURLoraModel"]
