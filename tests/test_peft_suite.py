"""PEFT's generic tuner suite (from the installed peft's sdist) run against tCURLoRA, LoRA-PT and HyPS.

Only the upstream tests that are parametrised by one of our config classes are collected (the rest test LoRA and
other methods); exclusions and their reasons live in ``tests/peft_suite/cases.py``. If the package registry cannot
be reached, the whole module is skipped with that reason on a developer's machine; in CI (``PEFT_TENSOR_CI=1``, as
``.ci/run`` sets it) its collection fails instead (``tests/_optional.py``).
"""

from tests.peft_suite.upstream import load_upstream_or_skip

_upstream = load_upstream_or_skip()

TestPeftCustomModel = _upstream.TestPeftCustomModel
TestMultipleActiveAdapters = _upstream.TestMultipleActiveAdapters
TestRequiresGrad = _upstream.TestRequiresGrad
TestMixedAdapterBatches = _upstream.TestMixedAdapterBatches
