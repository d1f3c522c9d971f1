"""Fixtures shared by the tuner tests (tests/tuners/ and tests/tuners/hyps/)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP barriers (and LAPACK's
    threads) make them several times slower: a module that uses this fixture runs single-threaded, and the setting
    is restored afterwards. Used by test_conv.py and, through hyps/conftest.py, by every HyPS module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
