"""Comparisons of float32 results that are the same mathematics computed by different operations.

When may a test demand bit-exactness (``torch.equal``)? Only when both sides run the same operations on the same data
in the same memory layout: identity at init, ``disable_adapter()`` against the base network, one file loaded twice,
a freshly decomposed adapter against the same adapter saved and loaded (the groups store their tensors in the layout a
state dict is loaded into, see ``TensorGroup._canonical_layout``). MKL and oneDNN choose FFT and GEMM kernels by CPU,
by instruction set (``MKL_ENABLE_INSTRUCTIONS``), by batch size and by memory layout, so two computations that are not
the same operations (a mixed-adapter batch against per-sample runs, merged against unmerged weights, a batch of 3
against a batch of 1) agree only up to float32 rounding, and by how much depends on the machine.

:func:`assert_float32_close` is the one tolerance for those comparisons. Its bound, for outputs of scale ``s``
(the largest ``|expected|``) through ``depth`` layers that each round:

    |actual - expected| <= depth * ROUNDING_PER_LAYER * eps32 * s          (eps32 = 2**-23 ~ 1.19e-7)

``ROUNDING_PER_LAYER = 32``: a layer's result is a sum of ``n`` products (matmul, convolution, FFT); blocked and
vectorised kernels reorder that sum, which moves it by a few ulps times ``sqrt(n)`` in practice (``n`` up to about
a thousand in the test-sized networks, ``sqrt(n) ~ 32``); errors of consecutive layers add. For the test-sized UNETR
(about 16 rounding layers on the path to the output) this allows about 6e-5 relative to the output scale: two orders of
magnitude above the 1e-6..2.5e-6 seen between CPUs, and three below what a wrong adapter, a dropped term or a wrong
sub-batch gives (1e-2 and more in these tests).
"""

from __future__ import annotations

import torch

EPS32 = torch.finfo(torch.float32).eps
ROUNDING_PER_LAYER = 32
# rounding layers on the path from input to output of the test-sized networks (tests/_models.py): the transformer
# blocks' Linear layers plus the decoder's convolutions and transposed convolutions
UNETR_DEPTH = 16
MLP_DEPTH = 4


def float32_tolerance(expected: torch.Tensor, depth: int) -> float:
    """Absolute tolerance for a float32 result of scale ``max |expected|`` through ``depth`` rounding layers."""
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    return depth * ROUNDING_PER_LAYER * EPS32 * max(scale, 1e-30)


def assert_float32_close(actual: torch.Tensor, expected: torch.Tensor, *, depth: int, msg: str = "") -> None:
    """``actual`` equals ``expected`` up to the float32 rounding of ``depth`` layers (see the module docstring).

    Comparisons of float64 results should use ``torch.testing.assert_close`` with float64 tolerances instead.
    """
    assert actual.shape == expected.shape, f"{msg} shapes differ: {tuple(actual.shape)} vs {tuple(expected.shape)}"
    atol = float32_tolerance(expected, depth)
    diff = float((actual.detach().double() - expected.detach().double()).abs().max()) if actual.numel() else 0.0
    assert diff <= atol, (f"{msg} max |actual - expected| = {diff:.3g} exceeds the float32 rounding bound {atol:.3g} "
                          f"(depth {depth}, scale {float(expected.detach().abs().max()):.3g})")
