"""peft_tensor: tensor-decomposition parameter-efficient fine-tuning for 3D medical imaging, as PEFT methods.

Importing this package registers ``TCURLORA``, ``LORAPT`` and ``HYPS`` with HuggingFace PEFT (each method's folder
calls :func:`peft_tensor.registry.register`), so ``get_peft_model(model, TCURLoraConfig(...))`` and
``PeftModel.from_pretrained`` work on our adapters.
"""

from .version import __version__

# one line per method; the import order is the registration order (what `peft-tensor list` shows)
from .tuners.tcurlora import TCURLoraConfig, TCURLoraModel
from .tuners.lorapt import LoraPTConfig, LoraPTModel
from .tuners.hyps import SWINUNETR_HYPS_TARGETS, HyPSConfig, HyPSModel
from .loading import load_adapter_checked, from_pretrained

__all__ = [
    "__version__",
    "TCURLoraConfig",
    "TCURLoraModel",
    "LoraPTConfig",
    "LoraPTModel",
    "HyPSConfig",
    "HyPSModel",
    "SWINUNETR_HYPS_TARGETS",
    "from_pretrained",
    "load_adapter_checked",
    "load_network",
    "LoadReport",
    "export_bundle",
    "preset_for",
]

# networks in and out, and their default targets (peft_tensor.networks), imported on first use: `import peft_tensor`
# stays light
_NETWORK_EXPORTS = ("load_network", "LoadReport", "export_bundle", "preset_for")


def __getattr__(name: str):
    if name in _NETWORK_EXPORTS:
        from . import networks

        return getattr(networks, name)
    raise AttributeError(f"module 'peft_tensor' has no attribute {name!r}")
