"""Tensor SVD and tensor CUR in the t-product algebra (see :mod:`.tproduct` for conventions).

Both work slice-wise in the Fourier domain on the ``L // 2 + 1`` independent rfft slices. The DC slice (and the
Nyquist slice when ``L`` is even) of a real tensor is real, so those slices get a *real* SVD / pseudo-inverse;
the other slices are complex and their conjugate partners are implied by ``irfft``. The factors that come back are
therefore exactly real. (A complex SVD on every slice would give the real slices an arbitrary phase, whose
imaginary part ``irfft`` silently drops, breaking the reconstruction at the 1e-2 level.)
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, Optional

import torch

from . import _openblas
from ._threads import single_threaded_cpu
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


def _complex_slice_ids(n_slices: int) -> list[int]:
    """The stored Fourier slices (``n_slices // 2 + 1``) other than the real DC / Nyquist ones."""
    real = _real_slice_ids(n_slices)
    return [i for i in range(n_slices // 2 + 1) if i not in real]


def _randomized_svd(m: torch.Tensor, rank: int, oversample: int = 10, n_iter: int = 2):
    """Top-``rank`` SVD of a batch of matrices by randomized subspace iteration (Halko, Martinsson & Tropp 2011).

    Deterministic for a given device (fixed generator seed). The cheapest option, but only approximate: with a
    fixed two power iterations it converges to the top-``rank`` subspace only when the spectrum decays. On the flat
    spectra of randomly initialised or lightly trained weights it returns a subspace far from the principal one
    (76% of ``max|W|`` off on a test-sized UNETR). Hence ``"auto"`` uses :func:`_eigh_svd`; this stays opt-in.
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


def _gram_upper(y: torch.Tensor) -> torch.Tensor:
    """``y^H y`` of a tall matrix ``y`` (m x n, m >= n); only the upper triangle is guaranteed (the lower may be 0).

    On CPU with SciPy installed this is one BLAS ``herk``/``syrk`` call (half the flops of a general product, which
    matters: the Gram matrix is the dominant cost of the exact top-``r`` SVD below). Elsewhere a plain matmul.
    """
    if y.device.type == "cpu" and _scipy_blas() is not None:
        blas = _scipy_blas()
        x = y.detach().resolve_conj().contiguous().numpy().T  # Fortran-ordered view of y^T (n x m): no copy
        if y.is_complex():
            herk = blas.get_blas_funcs("herk", (x,))
            g = herk(1.0, x, trans=0, lower=0)  # x x^H = y^T conj(y) = conj(y^H y)
            return torch.from_numpy(g).conj().resolve_conj()
        syrk = blas.get_blas_funcs("syrk", (x,))
        return torch.from_numpy(syrk(1.0, x, trans=0, lower=0))  # y^T y
    return y.mH @ y


def _top_eigvecs(g: torch.Tensor, k: int) -> torch.Tensor:
    """Eigenvectors of the ``k`` largest eigenvalues of a Hermitian ``g`` (upper triangle read), leading first.

    CPU with SciPy: LAPACK ``*heevr``/``*syevr`` restricted to those ``k`` (tridiagonalisation plus ``k`` vectors,
    about 4x faster than all of them). Otherwise ``torch.linalg.eigh`` (all eigenpairs; fast on GPUs).
    """
    n = g.shape[-1]
    if g.device.type == "cpu" and _scipy_blas() is not None:
        from scipy.linalg import eigh

        _, vecs = eigh(g.numpy(), lower=False, subset_by_index=[n - k, n - 1], driver="evr", check_finite=False,
                       overwrite_a=True)
        return torch.from_numpy(vecs).flip(-1)
    upper = torch.triu(g)
    full = upper + torch.triu(g, diagonal=1).mH
    return torch.linalg.eigh(full).eigenvectors[..., -k:].flip(-1)


def _scipy_blas():
    global _SCIPY_BLAS
    if _SCIPY_BLAS is False:
        try:
            from scipy.linalg import blas
        except ImportError:  # SciPy is optional: torch.linalg does the same, a few times slower on CPU
            blas = None
        _SCIPY_BLAS = blas
    return _SCIPY_BLAS


_SCIPY_BLAS = False


def _eigh_svd(m: torch.Tensor, rank: int, oversample: int = 8):
    """Exact top-``rank`` SVD of a batch of matrices from the Gram matrix of the smaller side.

    The leading ``rank + oversample`` eigenvectors of ``Y^H Y`` (``Y`` = the matrix or its conjugate transpose,
    whichever is tall) span the top right-singular subspace up to rounding; a Rayleigh-Ritz step (a thin SVD of the
    ``m x k`` matrix ``Y V_k``, in float64) then gives the top-``rank`` triplets, orthonormal ``U`` and singular values
    as accurate as a full SVD's. Rounding in the float32 Gram matrix only perturbs the top-``rank`` vectors towards
    directions outside the block, by ~eps32 / (relative gap between sigma_rank and sigma_(rank+oversample+1)), which
    is large even for flat spectra; nearly equal singular values inside the block are separated in float64. Unlike
    subspace iteration this does not depend on the gap after ``sigma_rank``, so it stays exact on the flat spectra of
    randomly initialised or lightly trained weights, where a float32 LAPACK SVD itself is off by up to 1e-3.
    """
    n1, n2 = m.shape[-2:]
    flip = n1 < n2
    k = min(rank + oversample, min(n1, n2))
    wide_dtype = torch.complex128 if m.is_complex() else torch.float64
    mats = m.reshape(-1, n1, n2)
    kern = _openblas.kernels() if m.device.type == "cpu" and m.dtype in (torch.float32, torch.complex64) else None
    us, ss, vhs = [], [], []
    for x in mats:
        y = x.mH if flip else x
        if kern is not None:  # GIL-free BLAS herk + LAPACK evr on x itself (no transposed copy)
            g = kern.gram_upper(x.detach().resolve_conj().contiguous(), columns=not flip)  # y^H y
            v = kern.top_eigh(g, k)[1].to(dtype=wide_dtype)
        else:
            y = y.contiguous()
            v = _top_eigvecs(_gram_upper(y), k).to(device=y.device, dtype=wide_dtype)  # (n, k)
        # evr's vectors are orthogonal only to about n * eps32 (5e-5 at n = 768), which Rayleigh-Ritz would turn into
        # errors of that size in the principal part: re-orthonormalise in float64 (n x k, cheap)
        v = torch.linalg.qr(v).Q
        # Rayleigh-Ritz in float64: the product too, or rounding at eps32 * sigma_1 decides between nearly equal
        # singular values inside the block (the float32 Gram only has to get the block right, not its order)
        xw = x.to(wide_dtype)  # converted as stored: a transposed conversion copy is several times slower
        ub, sb, vbh = torch.linalg.svd((v.mH @ xw).mH if flip else xw @ v, full_matrices=False)
        u_y = ub[:, :rank].to(y.dtype)
        v_y = (v @ vbh.mH[:, :rank]).to(y.dtype)
        s = sb[:rank].to(y.real.dtype if y.is_complex() else y.dtype)
        u, vh = (v_y, u_y.mH) if flip else (u_y, v_y.mH)
        us.append(u)
        ss.append(s)
        vhs.append(vh)
    batch = m.shape[:-2]
    return (torch.stack(us).reshape(*batch, n1, rank), torch.stack(ss).reshape(*batch, rank),
            torch.stack(vhs).reshape(*batch, rank, n2))


def _svd(m: torch.Tensor, rank: int, method: str):
    if method == "auto":
        method = "eigh" if 4 * (rank + 10) < min(m.shape[-2:]) else "full"
    if method == "full":
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        return u[..., :rank], s[..., :rank], vh[..., :rank, :]
    if method == "eigh":
        return _eigh_svd(m, rank)
    if method == "randomized":
        return _randomized_svd(m, rank)
    raise ValueError(f"svd method must be 'auto', 'full', 'eigh' or 'randomized', got {method!r}")


def _slice_workers(a_hat: torch.Tensor, n_problems: int) -> int:
    """Threads for the independent per-slice decompositions: torch's thread count (the caller's choice, e.g. 1 in
    the benchmarks), on CPU only and only where the kernels release the GIL (SciPy's wrappers do not)."""
    if a_hat.device.type != "cpu" or _openblas.kernels() is None or a_hat.dtype != torch.complex64:
        return 1
    return max(1, min(torch.get_num_threads(), os.cpu_count() or 1, n_problems))


def _svd_fourier(a_hat: torch.Tensor, n_slices: int, rank: int, method: str = "auto"):
    """Slice-wise truncated SVD of rfft slices, real on the DC/Nyquist slices. Returns complex U, real s, complex
    Vh."""
    real_ids = _real_slice_ids(n_slices)
    complex_ids = _complex_slice_ids(n_slices)
    n1, n2 = a_hat.shape[-2:]
    k = min(rank, n1, n2)
    u = a_hat.new_zeros(*a_hat.shape[:-2], n1, k)
    vh = a_hat.new_zeros(*a_hat.shape[:-2], k, n2)
    s = a_hat.real.new_zeros(*a_hat.shape[:-2], k)
    if method == "auto":
        method = "eigh" if 4 * (rank + 10) < min(n1, n2) else "full"
    if method == "eigh":  # one slice at a time: no gathered copy of the complex slices, single-threaded LAPACK
        workers = _slice_workers(a_hat, len(real_ids) + len(complex_ids))

        def one(i):
            if workers > 1:
                torch.set_num_threads(1)  # a new thread's OpenMP thread count starts at the default, not at 1
            x = a_hat[..., i, :, :]
            return _eigh_svd(x.real if i in real_ids else x, rank)

        with single_threaded_cpu(a_hat.device):
            if workers > 1:
                with ThreadPoolExecutor(max_workers=workers) as pool:
                    results = list(pool.map(one, range(a_hat.shape[-3])))
            else:
                results = [one(i) for i in range(a_hat.shape[-3])]
        for i, (ui, si, vhi) in enumerate(results):
            u[..., i, :, :], s[..., i, :], vh[..., i, :, :] = ui, si, vhi
        return u, s, vh
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

    ``method``: ``"full"`` (LAPACK SVD of every Fourier slice); ``"eigh"`` (exact top-``rank`` triplets from the
    leading eigenvectors of each slice's Gram matrix plus a float64 Rayleigh-Ritz step: agrees with ``"full"`` to
    rounding, ~1e-6 of ``max|a|`` in float32, whatever the spectrum, at a fraction of the cost);
    ``"randomized"`` (two power iterations: fastest, but far from the top subspace when the spectrum is flat);
    ``"auto"`` (``"eigh"`` when ``rank`` is small relative to the slice size, else ``"full"``).
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


def t_qr_whiteners(c: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Wc, Wr)`` ``(..., L, k, k)`` real, with ``C * Wc`` and ``Wr * R`` t-orthonormal (``Q_C``, ``Q_R^T``).

    Per Fourier slice ``C_f = Q_f T_f`` (thin QR) and ``R_f^H = Q'_f T'_f``; ``Wc_f = T_f^+`` and ``Wr_f =
    (T'_f^H)^+`` (a triangular solve; pseudo-inverses when a diagonal entry of some ``T`` is below 1e-8 of that
    slice's largest, so a rank-deficient ``C`` or ``R`` gives zero rows/columns, not infinities). Computed
    in float64 (real QR on the DC and Nyquist slices, so the spatial factors are exactly real); returned in float64.
    ``c``: ``(..., L, n1, k)``, ``r``: ``(..., L, k, n2)``.
    """
    n_slices = c.shape[SLICE_AXIS]
    c_hat, r_hat = to_fourier(c.double()), to_fourier(r.double())
    real = _real_slice_ids(n_slices)
    complex_ids = _complex_slice_ids(n_slices)

    def inverse_r(m_hat: torch.Tensor) -> torch.Tensor:
        k = m_hat.shape[-1]
        t = m_hat.new_zeros(*m_hat.shape[:-2], k, k)
        if complex_ids:
            t[..., complex_ids, :, :] = torch.linalg.qr(m_hat[..., complex_ids, :, :]).R
        for i in real:
            t[..., i, :, :] = torch.linalg.qr(m_hat[..., i, :, :].real).R.to(t.dtype)
        diag = t.diagonal(dim1=-2, dim2=-1).abs()
        if bool((diag > 1e-8 * diag.amax(dim=-1, keepdim=True)).all()):  # well conditioned: triangular inverse
            eye = torch.eye(k, dtype=t.dtype, device=t.device).expand_as(t)
            return torch.linalg.solve_triangular(t, eye, upper=True)
        return torch.linalg.pinv(t, rtol=1e-12)

    wc = inverse_r(c_hat)
    wr = inverse_r(r_hat.mH).mH
    return from_fourier(wc, n_slices), from_fourier(wr, n_slices)


def _abs_norm(z: torch.Tensor, dim: int) -> torch.Tensor:
    """2-norm of complex vectors along ``dim`` (about twice as fast on CPU as ``vector_norm`` on complex input)."""
    sq = z.real.square()
    sq += z.imag.square()  # in place: the same sums as re^2 + im^2, one buffer fewer
    return sq.sum(dim=dim).sqrt()


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
