"""Fetch PEFT's generic test-suite for the *installed* peft version and re-parametrise it with our cases.

The sdist comes from the package registry (``pip download --no-binary :all: peft==<version>``) into
``<repo>/.cache/peft-suite/`` (git-ignored), is never committed, and is re-used on later runs. Only three files are
taken: ``tests/test_custom_models.py``, ``testing_common.py`` and ``testing_utils.py``. In ``test_custom_models.py``
the case tables (``TEST_CASES``, ``MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES``, ``MIXED_ADAPTER_TEST_CASES``) are replaced
by ours from :mod:`tests.peft_suite.cases`; nothing else in upstream's tests is edited.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import tarfile
import types
from pathlib import Path

import peft

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "peft-suite"
PACKAGE = "peft_upstream_tests"
FILES = ("test_custom_models.py", "testing_common.py", "testing_utils.py")


class SuiteUnavailable(RuntimeError):
    """The sdist could not be fetched (registry unreachable)."""


def _download(version: str) -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    existing = sorted(CACHE.glob(f"peft-{version}.tar.gz"))
    if existing:
        return existing[0]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
           f"peft=={version}", "-d", str(CACHE)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    found = sorted(CACHE.glob(f"peft-{version}.tar.gz"))
    if proc.returncode != 0 or not found:
        raise SuiteUnavailable(
            f"could not fetch the peft {version} sdist from the package registry ({' '.join(cmd)}): "
            f"{(proc.stderr or proc.stdout).strip()[-400:]}"
        )
    return found[0]


_OVERRIDE = '''
# --- peft_tensor: our case tables replace upstream's (see tests/peft_suite/cases.py) ---
from tests.peft_suite.cases import TEST_CASES, MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES, MIXED_ADAPTER_TEST_CASES
'''


def _patch(source: str) -> str:
    for table in ("TEST_CASES", "MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES", "MIXED_ADAPTER_TEST_CASES"):
        source, n = re.subn(rf"^{table} = \[", f"_UPSTREAM_{table} = [", source, count=1, flags=re.M)
        if n != 1:
            raise SuiteUnavailable(f"upstream test_custom_models.py has no {table} table: its layout changed")
    anchor = "\n_UPSTREAM_TEST_CASES = ["
    source = source.replace(anchor, _OVERRIDE + anchor, 1)
    return source


def _stub_missing_optional_imports() -> None:
    """upstream's helpers import diffusers/datasets at module level for tests we do not run; stub them if absent."""
    for name, attrs in (("diffusers", ("StableDiffusionPipeline",)), ("datasets", ("load_dataset",))):
        try:
            importlib.import_module(name)
        except ImportError:
            mod = types.ModuleType(name)
            mod.__dict__["__peft_tensor_stub__"] = True
            for attr in attrs:
                setattr(mod, attr, None)
            sys.modules[name] = mod


def load_upstream() -> types.ModuleType:
    """Import the patched upstream ``test_custom_models`` module (fetching the sdist if needed)."""
    version = peft.__version__
    target = CACHE / f"peft-{version}" / PACKAGE
    if not all((target / f).is_file() for f in FILES):
        sdist = _download(version)
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdist) as tar:
            for f in FILES:
                member = tar.extractfile(f"peft-{version}/tests/{f}")
                if member is None:
                    raise SuiteUnavailable(f"{sdist.name} has no tests/{f}")
                text = member.read().decode("utf-8")
                if f == "test_custom_models.py":
                    text = _patch(text)
                (target / f).write_text(text, encoding="utf-8")
        (target / "__init__.py").write_text("", encoding="utf-8")
    _stub_missing_optional_imports()
    if str(target.parent) not in sys.path:
        sys.path.insert(0, str(target.parent))
    return importlib.import_module(f"{PACKAGE}.test_custom_models")


def load_upstream_or_skip() -> types.ModuleType:
    """:func:`load_upstream`, for ``tests/test_peft_suite.py`` at module level: if the suite cannot be fetched, the
    module is skipped with the reason on a developer's machine and its collection fails in CI (``PEFT_TENSOR_CI=1``,
    :func:`tests._optional.cannot_run`)."""
    from tests._optional import cannot_run

    try:
        return load_upstream()
    except SuiteUnavailable as exc:
        cannot_run(f"PEFT's generic suite NOT RUN: {exc}", "the package registry must be reachable (or the sdist in "
                   f"{CACHE})")
