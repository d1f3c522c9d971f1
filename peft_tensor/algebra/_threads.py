"""Run CPU linear algebra single-threaded for a block of code.

Threaded LAPACK (torch's and SciPy's OpenBLAS alike) spin-waits for cores that other processes hold: on a busy
2-core machine a 768 x 768 eigensolve took 0.9 s with two threads against 0.07 s with one. The decompositions at
adapter set-up are many small independent problems, so one thread each loses little on an idle machine and avoids
that cliff on a busy one. SciPy's bundled OpenBLAS has its own thread count, independent of torch's; it is set
through the library's exported ``*_set_num_threads`` when it can be found, and left alone otherwise.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
from typing import Optional

import torch

__all__ = ["single_threaded_cpu", "scipy_openblas_library"]

_LIBRARY: Optional[tuple] = None  # (CDLL, symbol prefix) once looked up; () when not found
_OPENBLAS: Optional[tuple] = None  # (set, get) once looked up; () when not found


def scipy_openblas_library() -> Optional[tuple]:
    """``(ctypes.CDLL, symbol prefix)`` of the OpenBLAS bundled with SciPy, or ``None`` when not found."""
    global _LIBRARY
    if _LIBRARY is None:
        _LIBRARY = ()
        try:
            import scipy
            import scipy.linalg  # noqa: F401  (loads the library, so the CDLL below is the same handle)

            site = os.path.dirname(os.path.dirname(scipy.__file__))
            for path in sorted(glob.glob(os.path.join(site, "scipy.libs", "*openblas*"))):
                lib = ctypes.CDLL(path)
                for prefix in ("scipy_", ""):
                    if getattr(lib, prefix + "openblas_set_num_threads", None) is not None:
                        _LIBRARY = (lib, prefix)
                        break
                if _LIBRARY:
                    break
        except (ImportError, OSError):
            pass
    return _LIBRARY or None


def _scipy_openblas():
    global _OPENBLAS
    if _OPENBLAS is None:
        _OPENBLAS = ()
        found = scipy_openblas_library()
        if found is not None:
            lib, prefix = found
            setter = getattr(lib, prefix + "openblas_set_num_threads", None)
            getter = getattr(lib, prefix + "openblas_get_num_threads", None)
            if setter is not None and getter is not None:
                getter.restype = ctypes.c_int
                _OPENBLAS = (setter, getter)
    return _OPENBLAS


@contextlib.contextmanager
def single_threaded_cpu(device: torch.device):
    """Limit torch and SciPy's OpenBLAS to one thread inside the block (CPU only); restore both after."""
    if torch.device(device).type != "cpu":
        yield
        return
    previous_torch = torch.get_num_threads()
    openblas = _scipy_openblas()
    previous_blas = openblas[1]() if openblas else None
    torch.set_num_threads(1)
    if openblas:
        openblas[0](1)
    try:
        yield
    finally:
        torch.set_num_threads(previous_torch)
        if openblas:
            openblas[0](previous_blas)
