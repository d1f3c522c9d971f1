"""The one module through which peft_tensor reaches PEFT internals (and torch's private convolution helpers).

Supported: ``peft>=0.21.2,<0.22`` (``pyproject.toml``), ``torch>=2.4``. PEFT has no plugin API, so a method that
lives outside PEFT relies on names that PEFT may change in any release. Each of them is named here, once, and
``tests/test_peft_compat.py`` asserts per touchpoint that it still exists with the signature or behaviour relied on:
a PEFT upgrade fails there first, with a message naming the touchpoint. Nothing else in the package imports from a
private PEFT module path or calls a private PEFT name except through the names below.

Touchpoints:

1. ``PeftType`` enum extension -- :func:`ensure_peft_type`: ``peft.utils.PeftType`` is a closed ``str``-``Enum``;
   a member (``name == value``) is added by writing ``_member_map_``, ``_value2member_map_`` and ``_member_names_``.
2. Method registry -- :func:`register_peft_method` (``peft.utils``) and the ``peft.mapping`` dicts
   ``PEFT_TYPE_TO_CONFIG_MAPPING`` / ``PEFT_TYPE_TO_TUNER_MAPPING`` / ``PEFT_TYPE_TO_PREFIX_MAPPING`` (read by the
   loaders and adapter-file checks; entries popped before a re-registration).
3. Loader wrappers -- :func:`install_loader_hooks`: ``PeftModel.from_pretrained`` (a ``classmethod`` in
   ``PeftModel.__dict__``) and ``PeftModel.load_adapter`` (a function there) are wrapped to run inside
   :func:`~peft_tensor.tuners._loading_context.loading_adapter`.
4. Tuner base classes -- ``BaseTuner``, ``BaseTunerLayer``, ``check_adapters_to_merge``,
   ``check_target_module_exists`` (``peft.tuners.tuners_utils``).
5. ``BaseTuner`` private hooks that the tuners override and call through ``super()`` -- :data:`TUNER_HOOKS`:
   ``_create_and_replace``, ``_replace_module``, ``_cast_adapter_dtype``, ``_unload_and_optionally_merge``,
   ``_remove_adapter_name_from_key``, ``_mark_only_adapters_as_trainable``, ``_prepare_adapter_config``; and
   ``_enable_peft_forward_hooks``, which ``BaseTuner`` lacks but ``PeftModel`` enters around a forward when the tuner
   defines it (mixed-adapter batches: it must pop ``adapter_names``).
6. ``BaseTunerLayer`` private members -- :func:`cast_input_dtype` (``_cast_input_dtype``),
   :func:`move_adapter_to_base_device` (``_move_adapter_to_device_of_base_layer``) and the state attributes a
   layer sets in its constructor, ``_active_adapter`` / ``_disable_adapters`` (:data:`LAYER_STATE`), read back by
   the public ``active_adapter`` / ``disable_adapters``.
7. Auxiliary wrappers -- ``AuxiliaryTrainingWrapper`` / ``ModulesToSaveWrapper`` (``peft.utils.other``) and
   :func:`auxiliary_adapters` (their private ``_adapters`` set).
8. ``BufferDict`` -- from the private module ``peft.tuners._buffer_dict``.
9. :class:`MonaiFriendlyTunerMixin` -- the work-around for ``BaseTuner._replace_module`` on ``modules_to_save``
   blocks (it copies ``child.weight`` onto the unwrapped module; a MONAI block has none).
10. torch's private convolution helpers -- :func:`is_conv_transpose` (``nn.modules.conv._ConvTransposeNd``),
    :func:`conv_forward` (``_ConvNd._conv_forward``), :func:`transposed_output_padding`
    (``_ConvTransposeNd._output_padding``).
11. ``get_pattern_key`` (``peft.utils.other``) -- how ``rank_pattern`` keys match module names, as PEFT's LoRA
    resolves them (``re.match(rf"(.*\\.)?({key})$", name)``, first matching key wins).
"""

from __future__ import annotations

import enum
import functools
from typing import Optional

import torch
from torch import nn

from .tuners._loading_context import loading_adapter

PEFT_RANGE = "peft>=0.21.2,<0.22"


class PeftTensorRegistrationError(RuntimeError):
    """PEFT's internals no longer look the way peft_tensor expects."""


try:
    from peft import PeftModel
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.tuners._buffer_dict import BufferDict
    from peft.tuners.tuners_utils import (
        BaseTuner,
        BaseTunerLayer,
        check_adapters_to_merge,
        check_target_module_exists,
    )
    from peft.utils import PeftType, register_peft_method
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper, get_pattern_key
except ImportError as exc:  # pragma: no cover - depends on the installed peft
    raise PeftTensorRegistrationError(
        f"peft_tensor cannot find a PEFT internal it builds on ({exc}). Install a supported release: "
        f"`pip install '{PEFT_RANGE}'`."
    ) from exc

__all__ = [
    "PEFT_RANGE", "PeftTensorRegistrationError",
    # 1-3 registration
    "PeftType", "ensure_peft_type", "register_peft_method", "PEFT_TYPE_TO_CONFIG_MAPPING",
    "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING", "install_loader_hooks",
    # 4-6 tuners and layers
    "BaseTuner", "BaseTunerLayer", "check_adapters_to_merge", "check_target_module_exists", "TUNER_HOOKS",
    "LAYER_STATE", "cast_input_dtype", "move_adapter_to_base_device",
    # 7-9 wrappers, BufferDict, the _replace_module fix
    "AuxiliaryTrainingWrapper", "ModulesToSaveWrapper", "auxiliary_adapters", "BufferDict", "MonaiFriendlyTunerMixin",
    # 10 torch's convolution helpers
    "is_conv_transpose", "conv_forward", "transposed_output_padding",
    # 11 rank_pattern matching
    "get_pattern_key",
]

# 5. the BaseTuner hooks the tuners override, with the parameters (after self/cls) they are called with
TUNER_HOOKS: dict[str, tuple[str, ...]] = {
    "_create_and_replace": ("peft_config", "adapter_name", "target", "target_name", "parent", "current_key"),
    "_replace_module": ("parent", "child_name", "new_module", "child"),
    "_cast_adapter_dtype": ("adapter_name", "autocast_adapter_dtype"),
    "_unload_and_optionally_merge": ("merge", "progressbar", "safe_merge", "adapter_names"),
    "_remove_adapter_name_from_key": ("key", "adapter_name"),
    "_mark_only_adapters_as_trainable": ("model",),
    "_prepare_adapter_config": ("peft_config", "model_config"),
}

# 6. BaseTunerLayer state a wrapped layer sets itself: private attribute -> the public property that reads it
LAYER_STATE: dict[str, str] = {"_active_adapter": "active_adapter", "_disable_adapters": "disable_adapters"}


# -- 1. PeftType ------------------------------------------------------------------------------------------------------
def _check_enum_internals() -> None:
    missing = [a for a in ("_member_map_", "_value2member_map_", "_member_names_") if not hasattr(PeftType, a)]
    if missing or not issubclass(PeftType, str) or not isinstance(PeftType, enum.EnumMeta):
        raise PeftTensorRegistrationError(
            "peft_tensor cannot register its methods: peft.utils.PeftType no longer looks like a str-Enum with "
            f"{', '.join(missing) or 'the expected layout'} (installed peft is incompatible). "
            f"Install a supported peft release, e.g. `pip install '{PEFT_RANGE}'`."
        )


def ensure_peft_type(name: str) -> PeftType:
    """Return the ``PeftType`` member ``name``, adding it (name == value) if this PEFT lacks it.

    Idempotent: importing twice, ``importlib.reload`` and a PEFT release that already ships a member of the same name
    all work."""
    existing = PeftType.__members__.get(name)
    if existing is not None:
        if existing.value != name:
            raise PeftTensorRegistrationError(
                f"peft.utils.PeftType.{name} exists with value {existing.value!r}; peft_tensor needs value == name. "
                "Install a peft release compatible with peft_tensor."
            )
        return existing
    _check_enum_internals()
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    # Bypass EnumType.__setattr__, which refuses to (re)assign members.
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    if name not in PeftType._member_names_:
        PeftType._member_names_.append(name)
    if PeftType(name) is not member:  # pragma: no cover - defensive
        raise PeftTensorRegistrationError(f"Adding PeftType.{name} did not take effect in this Python/PEFT.")
    return member


# -- 3. the loader wrappers -------------------------------------------------------------------------------------------
_HOOK_MARK = "__peft_tensor_loading_adapter__"


def _within_loading_adapter(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with loading_adapter():
            return func(*args, **kwargs)

    setattr(wrapper, _HOOK_MARK, True)
    return wrapper


def install_loader_hooks() -> None:
    """Run ``PeftModel.from_pretrained`` and ``PeftModel.load_adapter`` inside
    :func:`~peft_tensor.tuners._loading_context.loading_adapter` (idempotent; a reload does not wrap twice).

    The wrappers only enter that context and call PEFT's own method with the same arguments; the context is read by
    peft_tensor's tensor-group tuners alone (their adapters are built empty and filled by the file, so a plain
    ``PeftModel.from_pretrained(model, path)`` runs no decomposition), so PEFT's own methods load as before.
    ``PeftModelFor*`` subclasses inherit both; ``PeftMixedModel.load_adapter`` calls ``PeftModel.load_adapter``.
    A loader that bypasses both (``inject_adapter_in_model`` followed by ``set_peft_model_state_dict``, as
    transformers' ``load_adapter`` does) decomposes once at injection, unless it passes ``low_cpu_mem_usage=True``.
    """
    current = PeftModel.__dict__.get("from_pretrained")
    if isinstance(current, classmethod) and not getattr(current.__func__, _HOOK_MARK, False):
        PeftModel.from_pretrained = classmethod(_within_loading_adapter(current.__func__))
    current = PeftModel.__dict__.get("load_adapter")
    if callable(current) and not getattr(current, _HOOK_MARK, False):
        PeftModel.load_adapter = _within_loading_adapter(current)


# -- 6. BaseTunerLayer's private members ----------------------------------------------------------------------------
def cast_input_dtype(layer: BaseTunerLayer, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` cast to ``dtype`` unless the layer's ``cast_input_dtype_enabled`` is off (PEFT's own rule)."""
    return layer._cast_input_dtype(x, dtype)


def move_adapter_to_base_device(layer: BaseTunerLayer, adapter_name: str) -> None:
    """Move ``adapter_name``'s tensors of ``layer`` to the device (and float dtype) of its base layer."""
    layer._move_adapter_to_device_of_base_layer(adapter_name)


# -- 7. auxiliary wrappers -------------------------------------------------------------------------------------------
def auxiliary_adapters(module: nn.Module) -> set:
    """The adapter names an ``AuxiliaryTrainingWrapper`` (e.g. a ``modules_to_save`` copy) holds."""
    return getattr(module, "_adapters", set())


# -- 9. the _replace_module fix -------------------------------------------------------------------------------------
class MonaiFriendlyTunerMixin:
    """Mix into a ``BaseTuner`` subclass (before ``BaseTuner``); shared by every peft_tensor tuner.

    ``merge_and_unload``/``unload`` with ``modules_to_save`` naming whole blocks (e.g. UNETR's ``decoder2``) fails in
    peft 0.21: ``BaseTuner._replace_module`` copies ``child.weight`` onto the unwrapped module, and a block has no
    ``weight``. For auxiliary wrappers the unwrapped module is already complete, so it is put back as is.
    """

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        if isinstance(child, AuxiliaryTrainingWrapper):
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)


# -- 10. torch's private convolution helpers -------------------------------------------------------------------------
def is_conv_transpose(module: nn.Module) -> bool:
    """``nn.ConvTranspose1d/2d/3d`` (torch's private base class ``_ConvTransposeNd``)."""
    return isinstance(module, nn.modules.conv._ConvTransposeNd)


def conv_forward(conv: nn.Module, x: torch.Tensor, weight: torch.Tensor,
                 bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``conv``'s own convolution (its padding mode, stride, padding, dilation, groups) with another kernel/bias."""
    return conv._conv_forward(x, weight, bias)


def transposed_output_padding(conv: nn.Module, x: torch.Tensor, output_size) -> list[int]:
    """The output padding a transposed convolution uses for input ``x`` and ``output_size=`` (None: its own)."""
    return conv._output_padding(x, output_size, conv.stride, conv.padding, conv.kernel_size, conv.weight.dim() - 2,
                                conv.dilation)
