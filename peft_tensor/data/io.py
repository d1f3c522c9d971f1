"""NIfTI reading and atomic writing."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np


def read_nifti(path: str | os.PathLike):
    """Return (array, 4x4 affine) of a NIfTI file, array in its stored dtype (scaled data as float32)."""
    import nibabel as nib

    img = nib.load(str(path))
    if img.dataobj.slope not in (None, 1.0) or img.dataobj.inter not in (None, 0.0):
        data = np.asarray(img.get_fdata(dtype=np.float32))
    else:
        data = np.asarray(img.dataobj)
    return data, np.asarray(img.affine, dtype=np.float64)


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + "".join(path.suffixes), dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_nifti(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray) -> None:
    """Write ``data`` as NIfTI at ``path`` via a temporary file in the same folder and ``os.replace``."""
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64))
    img.header.set_data_dtype(np.asarray(data).dtype)
    _atomic(Path(path), lambda tmp: nib.save(img, tmp))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())

    _atomic(Path(path), write)
