"""PEFT's generic tuner suite (from the installed peft's sdist) run against tCURLoRA, LoRA-PT and HyPS.

Only the upstream tests that are parametrised by one of our config classes are collected (the rest test LoRA and
other methods); exclusions and their reasons live in ``tests/peft_suite/cases.py``. If the package registry cannot
be reached, the whole module is skipped with that reason (and ``PEFT_TENSOR_REQUIRE_PEFT_SUITE=1`` turns the skip
into a failure, as CI sets it).
"""

import os

import pytest

from tests.peft_suite.upstream import SuiteUnavailable, load_upstream

try:
    _upstream = load_upstream()
except SuiteUnavailable as exc:  # pragma: no cover - only without registry access
    if os.environ.get("PEFT_TENSOR_REQUIRE_PEFT_SUITE") == "1":
        raise
    pytest.skip(f"PEFT's generic suite NOT RUN: {exc}", allow_module_level=True)

TestPeftCustomModel = _upstream.TestPeftCustomModel
TestMultipleActiveAdapters = _upstream.TestMultipleActiveAdapters
TestRequiresGrad = _upstream.TestRequiresGrad
TestMixedAdapterBatches = _upstream.TestMixedAdapterBatches
