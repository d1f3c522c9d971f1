import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    """PEFT's generic suite (tests/test_peft_suite.py): keep only the tests parametrised by one of our configs and
    skip the listed exclusions, with their reasons (tests/peft_suite/cases.py)."""

    suite = [it for it in items if it.nodeid.startswith("tests/test_peft_suite.py")]
    if not suite:
        return
    from peft_tensor import HyPSConfig, LoraPTConfig, TCURLoraConfig
    from tests.peft_suite.cases import EXCLUSIONS

    ours = (HyPSConfig, LoraPTConfig, TCURLoraConfig)

    def is_ours(item):
        params = getattr(getattr(item, "callspec", None), "params", {})
        for value in params.values():
            if isinstance(value, type) and issubclass(value, ours):
                return True
            if isinstance(value, ours):
                return True
        return False

    deselected = [it for it in suite if not is_ours(it)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        drop = set(map(id, deselected))
        items[:] = [it for it in items if id(it) not in drop]
    for item in items:
        if not item.nodeid.startswith("tests/test_peft_suite.py"):
            continue
        for test, case, reason in EXCLUSIONS:
            if test in item.nodeid and case in item.nodeid:
                item.add_marker(pytest.mark.skip(reason=f"excluded: {reason}"))
                break


@pytest.fixture
def umask():
    """The process umask set to 0o022 for the test (restored afterwards), and a setter for another one: file-mode
    tests (tests/test_atomic.py, tests/security/test_writes.py) must not depend on the caller's umask."""
    old = os.umask(0o022)
    try:
        yield lambda mask: os.umask(mask)
    finally:
        os.umask(old)
