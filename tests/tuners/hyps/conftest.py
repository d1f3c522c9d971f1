"""Every HyPS test module runs single-threaded (the ``one_thread`` fixture of tests/tuners/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="module")
def _hyps_one_thread(one_thread):
    yield
