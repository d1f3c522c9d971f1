"""Machinery shared by the cross-layer tensor methods (tCURLoRA, LoRA-PT): see :mod:`.state`.

Every name of the former single module ``peft_tensor.tuners.tensor_group`` is re-exported here."""

from __future__ import annotations

from .state import ForwardScope, SliceAssignment, TensorGroup, TensorGroupLayer, TensorGroupTuner, cache_build
from .state import _device_of as _device_of
from .state import _Factors as _Factors
from .state import _incomplete_message as _incomplete_message
from .state import _inside_init_empty_weights as _inside_init_empty_weights
from .state import _refuse_incomplete_adapter_load as _refuse_incomplete_adapter_load
from .state import _to_device as _to_device

__all__ = ["cache_build", "ForwardScope", "TensorGroup", "TensorGroupLayer", "TensorGroupTuner", "SliceAssignment"]
