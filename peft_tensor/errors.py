"""Exceptions raised by peft_tensor. Every message says what was wrong and how to fix it."""

from __future__ import annotations


class PeftTensorError(ValueError):
    """Base class: bad input to a peft_tensor method (a ValueError, so generic handlers still catch it)."""


class TargetModulesError(PeftTensorError):
    """target_modules matched nothing, or matched layers the method does not support."""


class GroupingError(PeftTensorError):
    """The requested grouping of layers into tensors does not fit the model."""


class RankError(PeftTensorError):
    """The requested rank does not fit the matrices it decomposes."""


class AdapterLoadError(PeftTensorError):
    """An adapter directory/file cannot be loaded onto this base model."""


class MergeError(PeftTensorError):
    """The adapter cannot be merged into the base weights."""


class UnsafePathError(PeftTensorError):
    """A path would make a read or write leave its folder (a symbolic link where a regular file must be)."""


class PartialLoadWarning(UserWarning):
    """A pretrained network loaded only in part: most of its tensors keep their fresh initialisation."""
