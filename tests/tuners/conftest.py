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


@pytest.fixture
def no_decomposition(monkeypatch):
    """Every decomposition a method runs to build an adapter (tCURLoRA's tensor CUR and orthonormal whiteners,
    LoRA-PT's truncated t-SVD, HyPS's SVD) raises: a load under this fixture proves it fills the adapter from the
    file alone."""
    import peft_tensor.tuners.hyps.layer as hyps_layer
    import peft_tensor.tuners.lorapt.layer as lorapt_layer
    import peft_tensor.tuners.tcurlora.layer as tcurlora_layer

    def refuse(*args, **kwargs):
        raise AssertionError("loading ran a decomposition (tensor CUR, t-SVD or SVD)")

    monkeypatch.setattr(tcurlora_layer, "tensor_cur", refuse)
    monkeypatch.setattr(tcurlora_layer, "t_qr_whiteners", refuse)
    monkeypatch.setattr(lorapt_layer, "truncated_t_svd", refuse)
    monkeypatch.setattr(hyps_layer, "principal_factors", refuse)
