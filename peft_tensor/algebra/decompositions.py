"""Tensor SVD and tensor CUR in the t-product algebra (see :mod:`.tproduct` for conventions).

Both work slice-wise in the Fourier domain on the ``L // 2 + 1`` independent rfft slices. The DC slice (and the
Nyquist slice when ``L`` is even) of a real tensor is real, so those slices get a *real* SVD / pseudo-inverse;
the other slices are complex and their conjugate partners are implied by ``irfft``. The factors that come back are
therefore exactly real. (A complex SVD on every slice would give the real slices an arbitrary phase, whose
imaginary part ``irfft`` silently drops, breaking the reconstruction at the 1e-2 level.)
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .tproduct import SLICE_AXIS, compute_dtype, fourier_slice_weights, from_fourier, to_fourier

__all__ = ["TSVD", "TensorCUR", "t_svd", "truncated_t_svd", "tensor_cur", "t_pinv"]


class TSVD(NamedTuple):
    """``A = U * S * t_transpose(V)``.

    Shapes: ``U (..., L, n1, k)``, ``S (..., L, k, k)`` f-diagonal (every slice diagonal), ``V (..., L, n2, k)``.
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor


class TensorCUR(NamedTuple):
    """``A ~ C * U * R`` with ``C = A[..., :, cols]`` and ``R = A[..., rows, :]``.

    Shapes: ``C (..., L, n1, r)``, ``U (..., L, r, r)``, ``R (..., L, r, n2)``, indices ``(..., r)`` (ascending).
    """

    C: torch.Tensor
    U: torch.Tensor
    R: torch.Tensor
    col_idx: torch.Tensor
    row_idx: torch.Tensor


def _real_slice_ids(n_slices: int) -> list[int]:
    ids = [0]
    if n_slices % 2 == 0 and n_slices > 1:
        ids.append(n_slices // 2)
    return ids


def _randomized_svd(m: torch.Tensor, rank: int, oversample: int = 10, n_iter: int = 2):
    """Top-``rank`` SVD of a batch of matrices by randomized subspace iteration (Halko, Martinsson & Tropp 2011).

    Deterministic for a given device (fixed generator seed). Far cheaper than a full SVD when ``rank`` is much
    smaller than the matrix; accurate for the decaying spectra of trained weights.
    """
    n_rows, n_cols = m.shape[-2:]
    q = min(rank + oversample, n_rows, n_cols)
    gen = torch.Generator(device=m.device).manual_seed(0)
    real_dtype = m.real.dtype if m.is_complex() else m.dtype
    g = torch.randn(*m.shape[:-2], n_cols, q, generator=gen, device=m.device, dtype=real_dtype).to(m.dtype)
    m_h = m.mH.contiguous()  # a lazily conjugated view makes every complex matmul take a slow path
    basis = torch.linalg.qr(m @ g).Q
    for _ in range(n_iter):
        basis = torch.linalg.qr(m_h @ basis).Q
        basis = torch.linalg.qr(m @ basis).Q
    u_small, s, vh = torch.linalg.svd(basis.mH @ m, full_matrices=False)
    return (basis @ u_small)[..., :rank], s[..., :rank], vh[..., :rank, :]


def _svd(m: torch.Tensor, rank: int, method: str):
    if method == "auto":
        method = "randomized" if 4 * (rank + 10) < min(m.shape[-2:]) else "full"
    if method == "full":
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        return u[..., :rank], s[..., :rank], vh[..., :rank, :]
    if method == "randomized":
        return _randomized_svd(m, rank)
    raise ValueError(f"svd method must be 'auto', 'full' or 'randomized', got {method!r}")


def _svd_fourier(a_hat: torch.Tensor, n_slices: int, rank: int, method: str = "auto"):
    """Slice-wise truncated SVD of rfft slices, real on the DC/Nyquist slices. Returns complex U, real s, complex Vh."""
    real_ids = _real_slice_ids(n_slices)
    complex_ids = [i for i in range(a_hat.shape[-3]) if i not in real_ids]
    n1, n2 = a_hat.shape[-2:]
    k = min(rank, n1, n2)
    u = a_hat.new_zeros(*a_hat.shape[:-2], n1, k)
    vh = a_hat.new_zeros(*a_hat.shape[:-2], k, n2)
    s = a_hat.real.new_zeros(*a_hat.shape[:-2], k)
    if complex_ids:
        uc, sc, vhc = _svd(a_hat[..., complex_ids, :, :], rank, method)
        u[..., complex_ids, :, :], s[..., complex_ids, :], vh[..., complex_ids, :, :] = uc, sc, vhc
    for i in real_ids:
        ur, sr, vhr = _svd(a_hat[..., i, :, :].real.contiguous(), rank, method)
        u[..., i, :, :] = ur.to(u.dtype)
        s[..., i, :] = sr
        vh[..., i, :, :] = vhr.to(vh.dtype)
    return u, s, vh


def t_svd(a: torch.Tensor) -> TSVD:
    """Thin t-SVD of ``a`` ``(..., L, n1, n2)``: ``k = min(n1, n2)``; factors are exactly real."""
    if a.dim() < 3:
        raise ValueError(f"t_svd needs a tensor of shape (..., L, n1, n2), got {tuple(a.shape)}")
    return truncated_t_svd(a, min(a.shape[-2], a.shape[-1]), method="full")


def truncated_t_svd(a: torch.Tensor, rank: int, method: str = "auto") -> TSVD:
    """Tubal-rank-``rank`` t-SVD: the principal part ``U_r * S_r * V_r^T`` of ``a``.

    ``U_r`` and ``V_r`` are t-orthonormal (``U_r^T * U_r = I``). Ties among singular values, and the sign/phase of
    singular vectors, are not unique: callers that must reproduce a decomposition later should store it.

    ``method``: ``"full"`` (LAPACK SVD of every Fourier slice), ``"randomized"`` (subspace iteration for the top
    ``rank`` triplets; much faster for large slices) or ``"auto"`` (randomized when ``rank`` is small relative to
    the slice size).
    """
    if a.dim() < 3:
        raise ValueError(f"truncated_t_svd needs a tensor of shape (..., L, n1, n2), got {tuple(a.shape)}")
    n_slices, n1, n2 = a.shape[-3:]
    if not 1 <= rank <= min(n1, n2):
        raise ValueError(f"rank must be in [1, min(n1, n2)] = [1, {min(n1, n2)}], got {rank}")
    a_hat = to_fourier(a)
    u, s, vh = _svd_fourier(a_hat, n_slices, rank, method)
    U = from_fourier(u, n_slices)
    S = from_fourier(torch.diag_embed(s).to(u.dtype), n_slices)
    V = from_fourier(vh.mH, n_slices)
    return TSVD(U, S, V)


def t_pinv(a: torch.Tensor) -> torch.Tensor:
    """Slice-wise (Fourier-domain) Moore-Penrose pseudo-inverse: ``(..., L, n1, n2) -> (..., L, n2, n1)``, real."""
    n_slices = a.shape[SLICE_AXIS]
    a_hat = to_fourier(a)
    p = torch.linalg.pinv(a_hat)
    for i in _real_slice_ids(n_slices):
        p[..., i, :, :] = torch.linalg.pinv(a_hat[..., i, :, :].real).to(p.dtype)
    return from_fourier(p, n_slices)


def _abs_norm(z: torch.Tensor, dim: int) -> torch.Tensor:
    """2-norm of complex vectors along ``dim`` (about twice as fast on CPU as ``vector_norm`` on complex input)."""
    return (z.real.square() + z.imag.square()).sum(dim=dim).sqrt()


def _top_indices(scores: torch.Tensor, r: int) -> torch.Tensor:
    """Indices of the ``r`` largest scores along the last axis; ties go to the lower index; returned ascending."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :r]
    return torch.sort(order, dim=-1).values


def tensor_cur(a: torch.Tensor, rank: int, a_hat: Optional[torch.Tensor] = None) -> TensorCUR:
    """Deterministic tensor CUR of ``a`` ``(..., L, n1, n2)``.

    Columns: column ``j`` scores the sum over all ``L`` Fourier slices of the 2-norm of that column; the top
    ``rank`` are kept. Rows: on the selected columns, rows are scored the same way. ``U`` is the slice-wise
    pseudo-inverse of the ``rank x rank`` intersection, so ``C * U * R`` reproduces ``a`` when its tubal rank is at
    most ``rank`` (and the intersection captures it). ``a_hat`` may pass a precomputed ``to_fourier(a)``.
    """
    if a.dim() < 3:
        raise ValueError(f"tensor_cur needs a tensor of shape (..., L, n1, n2), got {tuple(a.shape)}")
    n_slices, n1, n2 = a.shape[-3:]
    if not 1 <= rank <= min(n1, n2):
        raise ValueError(f"rank must be in [1, min(n1, n2)] = [1, {min(n1, n2)}], got {rank}")
    if a_hat is None:
        a_hat = to_fourier(a)
    w = fourier_slice_weights(n_slices, device=a.device, dtype=compute_dtype(a.dtype))
    # column norms per Fourier slice: (..., H, n2); weighted sum over slices == sum over all L slices
    col_scores = (_abs_norm(a_hat, dim=-2) * w[:, None]).sum(dim=-2)
    col_idx = _top_indices(col_scores, rank)
    c_hat = torch.gather(a_hat, -1, col_idx[..., None, None, :].expand(*a_hat.shape[:-1], rank))
    row_scores = (_abs_norm(c_hat, dim=-1) * w[:, None]).sum(dim=-2)
    row_idx = _top_indices(row_scores, rank)

    a_c = a.to(compute_dtype(a.dtype))
    C = torch.gather(a_c, -1, col_idx[..., None, None, :].expand(*a_c.shape[:-1], rank))
    R = torch.gather(a_c, -2, row_idx[..., None, :, None].expand(*a_c.shape[:-2], rank, n2))
    W = torch.gather(C, -2, row_idx[..., None, :, None].expand(*C.shape[:-2], rank, rank))
    return TensorCUR(C=C, U=t_pinv(W), R=R, col_idx=col_idx, row_idx=row_idx)
