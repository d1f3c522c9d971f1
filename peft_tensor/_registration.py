"""Register peft_tensor's methods with HuggingFace PEFT.

PEFT has no plugin API: ``register_peft_method`` only accepts names that are already members of the closed
``PeftType`` str-Enum. Out-of-tree methods therefore add the enum member at import time. The member must have
``name == value`` (PEFT looks its mappings up with the raw JSON string) and must be entered in the enum's member
map, value map and member-name list. Everything here is idempotent: importing twice, ``importlib.reload`` and a
PEFT release that already ships a member of the same name all work.

PEFT has no hook either for "an adapter is being loaded from a file" (which lets a tensor-group adapter skip its
decomposition): :func:`install_loader_hooks` wraps PEFT's two public load entry points, ``PeftModel.from_pretrained``
and ``PeftModel.load_adapter``, so that they run inside :func:`peft_tensor.tuners._loading_context.loading_adapter`.
"""

from __future__ import annotations

import enum
import functools
import warnings

from peft.utils import PeftType

from .tuners._loading_context import loading_adapter

__all__ = ["ensure_peft_type", "install_loader_hooks", "register_method", "PeftTensorRegistrationError"]

_HOOK_MARK = "__peft_tensor_loading_adapter__"


class PeftTensorRegistrationError(RuntimeError):
    """PEFT's internals no longer look the way peft_tensor expects."""


def _check_enum_internals() -> None:
    missing = [a for a in ("_member_map_", "_value2member_map_", "_member_names_") if not hasattr(PeftType, a)]
    if missing or not issubclass(PeftType, str) or not isinstance(PeftType, enum.EnumMeta):
        raise PeftTensorRegistrationError(
            "peft_tensor cannot register its methods: peft.utils.PeftType no longer looks like a str-Enum with "
            f"{', '.join(missing) or 'the expected layout'} (installed peft is incompatible). "
            "Install a supported peft release, e.g. `pip install 'peft>=0.21.2,<0.22'`."
        )


def ensure_peft_type(name: str) -> PeftType:
    """Return the ``PeftType`` member ``name``, adding it (name == value) if this PEFT lacks it."""
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


def register_method(name: str, config_cls: type, model_cls: type, prefix: str) -> None:
    """Register (or re-register after a reload) a method with PEFT's mappings.

    Args:
        name: upper-case PeftType member name, e.g. ``"TCURLORA"``.
        config_cls: the PeftConfig subclass.
        model_cls: the BaseTuner subclass; its ``prefix`` must equal ``prefix``.
        prefix: the parameter-name prefix, e.g. ``"tcurlora_"``.
    """
    try:
        from peft.mapping import (
            PEFT_TYPE_TO_CONFIG_MAPPING,
            PEFT_TYPE_TO_PREFIX_MAPPING,
            PEFT_TYPE_TO_TUNER_MAPPING,
        )
        from peft.utils import register_peft_method
    except ImportError as exc:  # pragma: no cover - depends on the installed peft
        raise PeftTensorRegistrationError(
            f"peft_tensor cannot find PEFT's method registry ({exc}). Install `peft>=0.21.2,<0.22`."
        ) from exc

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
    from peft import PeftModel

    current = PeftModel.__dict__.get("from_pretrained")
    if isinstance(current, classmethod) and not getattr(current.__func__, _HOOK_MARK, False):
        PeftModel.from_pretrained = classmethod(_within_loading_adapter(current.__func__))
    current = PeftModel.__dict__.get("load_adapter")
    if callable(current) and not getattr(current, _HOOK_MARK, False):
        PeftModel.load_adapter = _within_loading_adapter(current)
