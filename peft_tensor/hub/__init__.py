"""Publish and load peft_tensor adapters on the HuggingFace Hub.

- :func:`build_network` / :func:`record_network`: remember a MONAI network's import path and constructor arguments.
- :func:`save_base_weights`: base weights as safetensors + sha256 reference.
- :func:`save_pretrained`: adapter + ``peft_tensor.json`` (provenance) + model card.
- :func:`push_to_hub`: one commit per repository (optionally the base weights to their own repository first).
- :func:`load_pretrained`: base network + weights (sha256-checked) + adapter(s) from a directory or repo id.
- :func:`adapter_info`: what an adapter holds, without building a model.
"""

from .adapter_files import KNOWN_PROVIDERS
from .cards import CardError, build_adapter_card, build_base_weights_card, eval_results_from
from .info import adapter_info, format_info
from .load import UnsafeWeightsError, load_pretrained
from .provenance import (
    PROVENANCE_FILE,
    BaseNetwork,
    ProvenanceError,
    WeightsRef,
    build_network,
    describe_network,
    record_network,
    save_base_weights,
)
from .publish import HubPublishError, PushResult, push_base_weights, push_to_hub, save_pretrained

__all__ = [
    "BaseNetwork", "CardError", "HubPublishError", "KNOWN_PROVIDERS", "PROVENANCE_FILE", "ProvenanceError",
    "PushResult", "UnsafeWeightsError", "WeightsRef", "adapter_info", "build_adapter_card", "build_base_weights_card",
    "build_network",
    "describe_network", "eval_results_from", "format_info", "load_pretrained", "push_base_weights", "push_to_hub",
    "record_network", "save_base_weights", "save_pretrained",
]
