"""Register peft_tensor's methods with HuggingFace PEFT.

PEFT has no plugin API: ``register_peft_method`` only accepts names that are already members of the closed
``PeftType`` str-Enum. Out-of-tree methods therefore add the enum member at import time. The member must have
``name == value`` (PEFT looks its mappings up with the raw JSON string) and must be entered in the enum's member
map, value map and member-name list. Everything here is idempotent: importing twice, ``importlib.reload`` and a
PEFT release that already ships a member of the same name all work.

PEFT has no hook either for "an adapter is being loaded from a file" (which lets a tensor-group adapter skip its
decomposition): :func:`install_loader_hooks` wraps PEFT's two public load entry points, ``PeftModel.from_pretrained``
and ``PeftModel.load_adapter``, so that they run inside :func:`peft_tensor.tuners._loading_context.loading_adapter`.

The PEFT internals all of this touches (the enum, the mappings, the two loaders) are reached through
:mod:`peft_tensor._peft_compat`, which names them and states the supported PEFT range.
"""

from __future__ import annotations

import warnings

from ._peft_compat import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
    PeftTensorRegistrationError,
    ensure_peft_type,
    install_loader_hooks,
    register_peft_method,
)
from ._peft_compat import _within_loading_adapter as _within_loading_adapter  # noqa: F401 - tests use it here

__all__ = ["ensure_peft_type", "install_loader_hooks", "register_method", "PeftTensorRegistrationError"]


def register_method(name: str, config_cls: type, model_cls: type, prefix: str) -> None:
    """Register (or re-register after a reload) a method with PEFT's mappings.

    Args:
        name: upper-case PeftType member name, e.g. ``"TCURLORA"``.
        config_cls: the PeftConfig subclass.
        model_cls: the BaseTuner subclass; its ``prefix`` must equal ``prefix``.
        prefix: the parameter-name prefix, e.g. ``"tcurlora_"``.
    """
    peft_type = ensure_peft_type(name)
    current = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if current is not None:
        ours = current.__module__.startswith("peft_tensor")
        if not ours:
            warnings.warn(
                f"peft already provides a method {name!r} ({current.__module__}); peft_tensor's implementation "
                "replaces it for this process.",
                stacklevel=3,
            )
        # Re-registration (second import, importlib.reload, or a foreign method of the same name): replace entries.
        PEFT_TYPE_TO_CONFIG_MAPPING.pop(peft_type, None)
        PEFT_TYPE_TO_TUNER_MAPPING.pop(peft_type, None)
        PEFT_TYPE_TO_PREFIX_MAPPING.pop(peft_type, None)
    register_peft_method(name=name.lower(), config_cls=config_cls, model_cls=model_cls, prefix=prefix)
    install_loader_hooks()
