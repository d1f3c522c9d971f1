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

__all__ = ["single_threaded_cpu"]

_OPENBLAS: Optional[tuple] = None  # (set, get) once looked up; () when not found


def _scipy_openblas():
    global _OPENBLAS
    if _OPENBLAS is None:
        _OPENBLAS = ()
        try:
            import scipy

            site = os.path.dirname(os.path.dirname(scipy.__file__))
            libs = glob.glob(os.path.join(site, "scipy.libs", "*openblas*"))
            for path in libs:
                lib = ctypes.CDLL(path)  # already loaded by scipy.linalg: the same handle, no second copy
                for prefix in ("scipy_openblas_", "openblas_"):
                    setter = getattr(lib, prefix + "set_num_threads", None)
                    getter = getattr(lib, prefix + "get_num_threads", None)
                    if setter is not None and getter is not None:
                        getter.restype = ctypes.c_int
                        _OPENBLAS = (setter, getter)
                        break
                if _OPENBLAS:
                    break
        except (ImportError, OSError):
            pass
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
