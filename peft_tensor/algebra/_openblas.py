"""Direct, GIL-free calls into the OpenBLAS that SciPy bundles: ``ssyrk``/``cherk`` (CBLAS) and ``ssyevr``/``cheevr``
(LAPACKE), on contiguous CPU torch tensors.

Why not ``scipy.linalg``: its f2py wrappers hold the GIL for the whole call (measured: a Python thread got about a
tenth of its CPU share while another thread ran ``scipy.linalg.eigh``), so independent decompositions could not run
side by side in threads. ``ctypes`` releases the GIL around foreign calls. Why not ``torch.linalg``: torch has no
``syrk`` (a Gram matrix by ``x.T @ x`` costs twice the flops) and no eigensolver restricted to a few eigenpairs
(``eigh`` of a 768 x 768 complex matrix is about 3x slower than ``heevr`` of its top 16 here).

The library is the one ``scipy.linalg`` already loaded (``scipy.libs/*openblas*``, symbols with the ``scipy_``
prefix in the ``scipy-openblas32`` builds SciPy ships since 1.13, or none in older ones). When it, or one of the
four symbols, cannot be found, :func:`kernels` returns ``None`` and callers use SciPy / torch instead.
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch

from ._threads import scipy_openblas_library

__all__ = ["Kernels", "kernels"]

_ROW_MAJOR, _NO_TRANS, _TRANS, _CONJ_TRANS, _UPPER = 101, 111, 112, 113, 121  # CBLAS enums
_LAPACK_ROW_MAJOR = 101

_c_int, _c_float, _p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p


class Kernels:
    """Gram matrices (``ssyrk`` / ``cherk``) and top-``k`` symmetric / Hermitian eigenpairs (``ssyevr`` /
    ``cheevr``) in single precision on row-major (C-contiguous) CPU tensors, GIL-free."""

    def __init__(self, lib, prefix: str):
        blas_args = [_c_int, _c_int, _c_int, _c_int, _c_int, _c_float, _p, _c_int, _c_float, _p, _c_int]
        self._ssyrk = getattr(lib, prefix + "cblas_ssyrk")
        self._cherk = getattr(lib, prefix + "cblas_cherk")
        for f in (self._ssyrk, self._cherk):
            f.restype = None
            f.argtypes = blas_args
        evr_args = [_c_int, ctypes.c_char, ctypes.c_char, ctypes.c_char, _c_int, _p, _c_int, _c_float, _c_float,
                    _c_int, _c_int, _c_float, _p, _p, _p, _c_int, _p]
        self._ssyevr = getattr(lib, prefix + "LAPACKE_ssyevr")
        self._cheevr = getattr(lib, prefix + "LAPACKE_cheevr")
        for f in (self._ssyevr, self._cheevr):
            f.restype = _c_int
            f.argtypes = evr_args

    def gram_upper(self, x: torch.Tensor, columns: bool) -> torch.Tensor:
        """Upper triangle of ``x^H x`` (``columns``) or ``x x^H`` of a contiguous float32 / complex64 CPU matrix;
        the strict lower triangle of the result is zero. Half the flops of a matrix product."""
        if x.dtype not in (torch.float32, torch.complex64) or x.device.type != "cpu" or not x.is_contiguous():
            raise ValueError(f"gram_upper needs a contiguous float32 or complex64 CPU matrix, got {x.dtype} on "
                             f"{x.device} (contiguous: {x.is_contiguous()})")
        rows, cols = x.shape
        n, k = (cols, rows) if columns else (rows, cols)
        out = torch.zeros(n, n, dtype=x.dtype)
        fn, trans = (self._cherk, _CONJ_TRANS) if x.is_complex() else (self._ssyrk, _TRANS)
        fn(_ROW_MAJOR, _UPPER, trans if columns else _NO_TRANS, n, k, 1.0, x.data_ptr(), cols, 0.0, out.data_ptr(),
           n)
        return out

    def top_eigh(self, g: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` largest eigenpairs of a symmetric float32 / Hermitian complex64 ``g`` (only its upper triangle
        is read; ``g`` is overwritten), leading first: values ``(k,)``, vectors ``(n, k)``."""
        if g.dtype not in (torch.float32, torch.complex64) or not g.is_contiguous() or g.device.type != "cpu":
            raise ValueError("top_eigh needs a contiguous float32 or complex64 CPU matrix")
        n = g.shape[-1]
        w = torch.empty(n, dtype=torch.float32)
        z = torch.empty(n, k, dtype=g.dtype)
        found = _c_int(0)
        isuppz = (_c_int * (2 * max(1, k)))()
        fn = self._cheevr if g.is_complex() else self._ssyevr
        info = fn(_LAPACK_ROW_MAJOR, b"V", b"I", b"U", n, g.data_ptr(), n, 0.0, 0.0, n - k + 1, n, 0.0,
                  ctypes.byref(found), w.data_ptr(), z.data_ptr(), k, isuppz)
        if info != 0 or found.value != k:
            raise RuntimeError(f"LAPACK ?{'he' if g.is_complex() else 'sy'}evr failed (info={info}, "
                               f"{found.value} of {k} eigenpairs); the matrix has non-finite entries?")
        return w[:k].flip(0), z.flip(-1)


_KERNELS: Optional[object] = None  # False once looked up and not found


def kernels() -> Optional[Kernels]:
    """The GIL-free kernels, or ``None`` where SciPy's OpenBLAS (or one of its symbols) is not found."""
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = False
        found = scipy_openblas_library()
        if found is not None:
            try:
                _KERNELS = Kernels(*found)
            except AttributeError:  # an OpenBLAS built without CBLAS / LAPACKE
                _KERNELS = False
    return _KERNELS or None
