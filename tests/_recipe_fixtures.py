"""Tiny NIfTI fixtures for the data and recipe tests (written by the tests themselves, 32^3 voxels)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TINY_MODEL = {"name": "unetr", "img_size": 32, "feature_size": 8, "hidden_size": 96, "mlp_dim": 192, "num_heads": 4,
              "dropout_rate": 0.0}


def blob_volume(seed: int, size: int = 32, codes=(1,)):
    """A brain-like image with an ellipsoid 'structure' per label code, and the matching label map."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), -1).astype(np.float32)
    c = size / 2 + rng.uniform(-2, 2, 3)
    brain = (((grid - size / 2) / (size * 0.42)) ** 2).sum(-1) <= 1
    image = np.where(brain, 1.0, 0.0).astype(np.float32)
    labels = np.zeros((size,) * 3, np.int16)
    for k, code in enumerate(codes):
        centre = c + np.array([(k - (len(codes) - 1) / 2) * 6, 0, 0])
        radii = np.array([3.5, 5.0, 4.0]) * rng.uniform(0.9, 1.1, 3)
        inside = (((grid - centre) / radii) ** 2).sum(-1) <= 1
        labels[inside] = code
        image[inside] = 1.6 + 0.1 * k
    image += rng.normal(0, 0.05, image.shape).astype(np.float32) * brain
    return image, labels


def write_nifti(path: Path, data: np.ndarray, spacing: float = 1.5) -> None:
    import nibabel as nib

    aff = np.diag([spacing, spacing, spacing, 1.0])
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, aff), str(path))


def pairs_dataset(root: Path, n: int = 6, codes=(17, 53), splits: dict | None = None) -> Path:
    """``<id>_img.nii.gz`` / ``<id>_mask.nii.gz`` pairs (aseg-like codes) plus ``splits.json``."""
    root.mkdir(parents=True, exist_ok=True)
    ids = [f"case{i:02d}" for i in range(n)]
    for i, cid in enumerate(ids):
        img, lab = blob_volume(i, codes=codes)
        write_nifti(root / f"{cid}_img.nii.gz", img)
        write_nifti(root / f"{cid}_mask.nii.gz", lab)
    splits = splits or {"train": ids[: n - 2], "val": ids[n - 2 : n - 1], "test": ids[n - 1 :]}
    (root / "splits.json").write_text(json.dumps(splits))
    return root


def msd_dataset(root: Path, n: int = 5) -> Path:
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        img, lab = blob_volume(100 + i, codes=(1, 2))
        write_nifti(root / "imagesTr" / f"hippocampus_{i:03d}.nii.gz", img)
        write_nifti(root / "labelsTr" / f"hippocampus_{i:03d}.nii.gz", lab.astype(np.uint8))
        items.append({"image": f"./imagesTr/hippocampus_{i:03d}.nii.gz",
                      "label": f"./labelsTr/hippocampus_{i:03d}.nii.gz"})
    meta = {"name": "Hippocampus", "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
            "numTraining": n, "training": items, "test": []}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def brats_dataset(root: Path, n: int = 3) -> Path:
    for i in range(n):
        cid = f"BraTS2021_{i:05d}"
        img, lab = blob_volume(200 + i, codes=(1, 2, 4))
        write_nifti(root / cid / f"{cid}_flair.nii.gz", img, 1.0)
        write_nifti(root / cid / f"{cid}_t1.nii.gz", img * 0.5, 1.0)
        write_nifti(root / cid / f"{cid}_seg.nii.gz", lab.astype(np.uint8), 1.0)
    return root
