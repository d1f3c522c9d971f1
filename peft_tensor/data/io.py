"""NIfTI reading and atomic writing."""

from __future__ import annotations

import os

import numpy as np

from .._atomic import atomic_write, atomic_write_text  # noqa: F401  (re-exported for the data code)


def read_nifti(path: str | os.PathLike):
    """Return (array, 4x4 affine) of a NIfTI file, array in its stored dtype (scaled data as float32)."""
    import nibabel as nib

    img = nib.load(str(path))
    if img.dataobj.slope not in (None, 1.0) or img.dataobj.inter not in (None, 0.0):
        data = np.asarray(img.get_fdata(dtype=np.float32))
    else:
        data = np.asarray(img.dataobj)
    return data, np.asarray(img.affine, dtype=np.float64)


def atomic_write_nifti(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray) -> None:
    """Write ``data`` as NIfTI at ``path`` via a temporary file in the same folder and ``os.replace``."""
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64))
    img.header.set_data_dtype(np.asarray(data).dtype)
    atomic_write(path, lambda tmp: nib.save(img, tmp))


