"""From case dicts (NIfTI paths) to tensors: deterministic preprocessing, then seeded per-sample augmentation.

The training batch of step ``t`` is a pure function of (seed, t): which cases are drawn and how each is augmented
is seeded from (seed, t, position in the global batch). So a resumed run sees exactly the batches of an
uninterrupted one, and ``W`` processes that each take their slice of the global batch see exactly the samples of a
single process -- no sampler or RNG state needs saving.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Case:
    """A preprocessed case: ``image`` [1, X, Y, Z] float32 (zero-mean unit-variance inside the brain),
    ``label`` [1, X, Y, Z] uint8 in {0, 1}, ``spacing`` in mm, ``affine`` 4x4."""

    id: str
    image: torch.Tensor
    label: torch.Tensor
    spacing: tuple
    affine: np.ndarray


class _MapForeground:
    """Label codes in ``foreground`` -> 1, everything else -> 0 (all non-zero codes if ``foreground`` is empty)."""

    def __init__(self, foreground):
        self.foreground = tuple(int(v) for v in foreground)

    def __call__(self, data):
        lab = torch.as_tensor(data["label"])
        lab = torch.round(lab)
        if self.foreground:
            fg = torch.zeros_like(lab, dtype=torch.bool)
            for v in self.foreground:
                fg |= lab == v
        else:
            fg = lab != 0
        out = dict(data)
        out["label"] = fg.to(torch.uint8)
        return out


def preprocessing(foreground, spacing: float | None = None, min_size: tuple | None = None):
    """MONAI pipeline: load, channel first, RAS orientation, optional resampling to ``spacing`` mm, binary label,
    intensity normalisation on non-zero voxels, padding up to ``min_size``."""
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        EnsureTyped,
        LoadImaged,
        NormalizeIntensityd,
        Orientationd,
        Spacingd,
        SpatialPadd,
    )

    steps = [
        LoadImaged(keys=("image", "label"), image_only=True),
        EnsureChannelFirstd(keys=("image", "label")),
        Orientationd(keys=("image", "label"), axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
    ]
    if spacing:
        steps.append(Spacingd(keys=("image", "label"), pixdim=(spacing,) * 3, mode=("bilinear", "nearest")))
    steps += [
        EnsureTyped(keys=("image", "label"), dtype=torch.float32, track_meta=True),
        _MapForeground(foreground),
        NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
    ]
    if min_size:
        steps.append(SpatialPadd(keys=("image", "label"), spatial_size=tuple(min_size)))
    return Compose(steps)


def load_cases(items: list, foreground, spacing: float | None = None, min_size: tuple | None = None) -> list:
    """Preprocess every case once and keep it in memory (the cohorts here are small; see ``CacheDataset`` for a
    larger-than-memory variant)."""
    from monai.data import MetaTensor

    pipe = preprocessing(foreground, spacing, min_size)
    cases = []
    for item in items:
        out = pipe({"image": item["image"], "label": item["label"]})
        img, lab = out["image"], out["label"]
        aff = np.asarray(img.affine) if isinstance(img, MetaTensor) else np.eye(4)
        spac = tuple(float(s) for s in np.sqrt((aff[:3, :3] ** 2).sum(0)))
        cases.append(
            Case(item.get("id", str(item["image"])), torch.as_tensor(img).float().contiguous(),
                 torch.as_tensor(lab).to(torch.uint8).contiguous(), spac, aff)
        )
    return cases


def seed_for(*parts) -> int:
    """A 31-bit seed from any hashable parts (stable across processes and Python runs)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "little") & 0x7FFFFFFF


def augmentation(patch: tuple, pos: float = 1.0, neg: float = 1.0, crop: str = "random"):
    """The papers' training augmentation: random crop, flips on the three axes, intensity scale and shift.

    ``crop="random"``: uniform random crops (the papers). ``crop="posneg"``: crops centred on a foreground voxel
    with probability pos / (pos + neg) -- faster to learn small structures, but a network with absolute position
    embeddings (UNETR's ViT) then learns "foreground sits at the centre" and over-segments at sliding-window
    inference; use it with care."""
    from monai.transforms import (
        Compose,
        RandCropByPosNegLabeld,
        RandFlipd,
        RandScaleIntensityd,
        RandShiftIntensityd,
        RandSpatialCropd,
    )

    if crop == "random":
        cropper = RandSpatialCropd(keys=("image", "label"), roi_size=tuple(patch), random_size=False)
    elif crop == "posneg":
        cropper = RandCropByPosNegLabeld(keys=("image", "label"), label_key="label", spatial_size=tuple(patch),
                                         pos=pos, neg=neg, num_samples=1, image_key=None)
    else:
        raise ValueError(f"train.crop must be 'random' or 'posneg', got {crop!r}")
    return Compose(
        [
            cropper,
            RandFlipd(keys=("image", "label"), prob=0.5, spatial_axis=0),
            RandFlipd(keys=("image", "label"), prob=0.5, spatial_axis=1),
            RandFlipd(keys=("image", "label"), prob=0.5, spatial_axis=2),
            RandScaleIntensityd(keys="image", factors=0.1, prob=1.0),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=1.0),
        ],
        lazy=False,
    )


def sample_batch(cases: list, step: int, global_batch: int, seed: int, patch: tuple, rank: int = 0,
                 world_size: int = 1, aug=None):
    """The slice of step ``step``'s global batch that belongs to ``rank``.

    Returns (images [B, 1, *patch], labels [B, 1, *patch] long) with B = global_batch // world_size."""
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} is not divisible by {world_size} processes")
    aug = aug or augmentation(patch)
    per_rank = global_batch // world_size
    g = np.random.default_rng(seed_for(seed, "batch", step))
    picks = g.integers(0, len(cases), size=global_batch)
    imgs, labs = [], []
    for j in range(rank * per_rank, (rank + 1) * per_rank):
        case = cases[int(picks[j])]
        aug.set_random_state(seed=seed_for(seed, "aug", step, j))
        out = aug({"image": case.image, "label": case.label.float()})
        out = out[0] if isinstance(out, list) else out
        imgs.append(torch.as_tensor(out["image"]).float())
        labs.append(torch.as_tensor(out["label"]).round().long())
    return torch.stack(imgs), torch.stack(labs)
