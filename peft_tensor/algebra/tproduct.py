"""The t-product algebra of third-order tensors (Kilmer & Martin), as pure functions.

Convention: a third-order tensor with ``L`` frontal slices of size ``n1 x n2`` is stored as a torch tensor of
shape ``(..., L, n1, n2)``: the slice axis is ``-3`` and any leading axes are batch axes. The t-product is a
circular convolution along the slice axis,

    (A * B)_k = sum_a A_a @ B_{(k - a) mod L},

computed as slice-wise matrix products after a real FFT along that axis. For real data only ``L // 2 + 1``
Fourier slices are independent (the rest are complex conjugates), so every transform here is ``rfft``/``irfft``.

Precision: FFTs run in float32 at least (float64 stays float64), whatever the input dtype (cuFFT has no bfloat16
and float16 only for power-of-two lengths). Results are returned in that compute dtype; callers cast.
"""

from __future__ import annotations

import torch

__all__ = [
    "compute_dtype",
    "to_fourier",
    "from_fourier",
    "fourier_slice_weights",
    "t_product",
    "t_product_fourier",
    "t_transpose",
    "t_identity",
]

SLICE_AXIS = -3


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Real dtype the algebra runs in for an input of ``dtype``: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def to_fourier(a: torch.Tensor) -> torch.Tensor:
    """rfft along the slice axis: ``(..., L, n1, n2)`` real -> ``(..., L//2+1, n1, n2)`` complex."""
    return torch.fft.rfft(a.to(compute_dtype(a.dtype)), dim=SLICE_AXIS)


def from_fourier(a_hat: torch.Tensor, n_slices: int) -> torch.Tensor:
    """Inverse of :func:`to_fourier`: ``(..., L//2+1, n1, n2)`` complex -> ``(..., L, n1, n2)`` real.

    ``irfft`` imposes conjugate symmetry, so the result is exactly real by construction. The imaginary parts of the
    DC slice (and of the Nyquist slice when ``L`` is even) are discarded: factors put there must be real.
    """
    return torch.fft.irfft(a_hat, n=n_slices, dim=SLICE_AXIS)


def fourier_slice_weights(n_slices: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Multiplicity of each rfft slice in the full FFT: 1 for DC (and Nyquist when L is even), 2 otherwise."""
    n_half = n_slices // 2 + 1
    w = torch.full((n_half,), 2.0, device=device, dtype=dtype)
    w[0] = 1.0
    if n_slices % 2 == 0:
        w[-1] = 1.0
    return w


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() < 3 or b.dim() < 3:
        raise ValueError(
            f"t-product needs tensors of shape (..., L, n1, n2); got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape[SLICE_AXIS] != b.shape[SLICE_AXIS]:
        raise ValueError(
            f"t-product needs the same number of slices; got {a.shape[SLICE_AXIS]} and {b.shape[SLICE_AXIS]}"
        )
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"t-product inner sizes differ: {tuple(a.shape)} * {tuple(b.shape)}")


def t_product_fourier(a_hat: torch.Tensor, b_hat: torch.Tensor) -> torch.Tensor:
    """The t-product in the Fourier domain: slice-wise matrix products of rfft slices."""
    return a_hat @ b_hat


def t_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """t-product ``A * B``: ``(..., L, n1, n2) x (..., L, n2, n3) -> (..., L, n1, n3)``, real, differentiable."""
    _check_pair(a, b)
    n = a.shape[SLICE_AXIS]
    return from_fourier(t_product_fourier(to_fourier(a), to_fourier(b)), n)


def t_transpose(a: torch.Tensor) -> torch.Tensor:
    """t-transpose: transpose every slice and reverse the order of slices 1..L-1.
    ``(..., L, n1, n2) -> (..., L, n2, n1)``.

    It satisfies ``t_transpose(A * B) == t_transpose(B) * t_transpose(A)``; in the Fourier domain it is the
    conjugate transpose of every slice.
    """
    at = a.transpose(-1, -2)
    if a.shape[SLICE_AXIS] == 1:
        return at
    rest = torch.flip(at.narrow(SLICE_AXIS, 1, a.shape[SLICE_AXIS] - 1), dims=(SLICE_AXIS,))
    return torch.cat([at.narrow(SLICE_AXIS, 0, 1), rest], dim=SLICE_AXIS)


def t_identity(n: int, n_slices: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Identity tensor: first slice the ``n x n`` identity, the others zero. Shape ``(L, n, n)``."""
    eye = torch.zeros(n_slices, n, n, device=device, dtype=dtype)
    eye[0] = torch.eye(n, device=device, dtype=dtype)
    return eye
