"""From case dicts (NIfTI paths) to tensors: configurable deterministic preprocessing (MONAI transforms), then
seeded per-sample augmentation.

Preprocessing (:class:`Preprocess`, the ``data.preprocess`` section of a config) is deterministic, so MONAI's
``CacheDataset`` / ``PersistentDataset`` may keep its result in memory or on disk (:mod:`peft_tensor.data.datasets`).
The training batch of step ``t`` is a pure function of (seed, t): which cases are drawn and how each is augmented
is seeded from (seed, t, position in the global batch). So a resumed run sees exactly the batches of an
uninterrupted one, ``W`` processes that each take their slice of the global batch see exactly the samples of a
single process, and any number of DataLoader workers produce the same batches -- no sampler or RNG state needs
saving.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from monai.transforms import Transform

from .labels import LabelTask, as_task

INTENSITY_MODES = ("nonzero_zscore", "zscore", "window", "none")


@dataclass
class Case:
    """A preprocessed case: ``image`` [C, X, Y, Z] float32, ``label`` uint8 -- class indices [1, X, Y, Z] (softmax
    tasks, 0 = background) or K binary region channels [K, X, Y, Z] (multi-label tasks) --, ``spacing`` in mm,
    ``affine`` 4x4."""

    id: str
    image: torch.Tensor
    label: torch.Tensor
    spacing: tuple
    affine: np.ndarray


@dataclass
class Preprocess:
    """Deterministic preprocessing of one dataset (``data.preprocess`` in a config).

    ``orientation``: axis codes to reorient to (``RAS``; ``null`` keeps the files' orientation).
    ``spacing``: resample to this voxel size in mm (a number or three; ``null`` keeps the files' grid).
    ``intensity``: ``nonzero_zscore`` (zero mean, unit variance inside the non-zero region, per channel: MRI brain
    images, the default), ``zscore`` (over the whole image), ``window`` (clip to ``window: [a_min, a_max]`` and
    scale to [0, 1]: CT in Hounsfield units, e.g. ``[-175, 250]`` for the abdomen) or ``none``.
    ``crop_foreground``: crop every case to the bounding box of its non-zero image voxels (plus ``margin``) before
    anything else is stored -- smaller cached cases when volumes carry a lot of empty background.
    The training crop / inference window is ``train.patch`` (cases smaller than it are zero-padded)."""

    orientation: str | None = "RAS"
    spacing: float | list | None = None
    intensity: str = "nonzero_zscore"
    window: list | None = None
    crop_foreground: bool = False
    margin: int = 0

    def __post_init__(self):
        if self.intensity not in INTENSITY_MODES:
            raise ValueError(f"data.preprocess.intensity must be one of {', '.join(INTENSITY_MODES)}, "
                             f"got {self.intensity!r}")
        if self.intensity == "window" and (not self.window or len(self.window) != 2):
            raise ValueError("data.preprocess.intensity=window needs data.preprocess.window: [a_min, a_max] "
                             "(e.g. [-175, 250] for abdominal CT in HU)")
        if self.spacing is not None:
            sp = [float(s) for s in (self.spacing if isinstance(self.spacing, (list, tuple)) else [self.spacing] * 3)]
            if len(sp) != 3 or min(sp) <= 0:
                raise ValueError(f"data.preprocess.spacing must be a positive number or three, got {self.spacing}")
            self.spacing = sp

    @classmethod
    def from_config(cls, data_cfg: dict | None) -> "Preprocess":
        """``data.preprocess`` (a mapping), with the older ``data.spacing_mm`` as the spacing."""
        data_cfg = dict(data_cfg or {})
        pre = dict(data_cfg.get("preprocess") or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(pre) - known)
        if unknown:
            raise ValueError(f"unknown data.preprocess keys {unknown}; known: {sorted(known)}")
        if data_cfg.get("spacing_mm") and pre.get("spacing") is None:
            pre["spacing"] = data_cfg["spacing_mm"]
        return cls(**pre)

    def to_dict(self) -> dict:
        return asdict(self)


class EncodeLabel(Transform):
    """Raw label codes -> the task's training label (:meth:`LabelTask.encode`). A MONAI ``Transform``, so that
    ``CacheDataset`` / ``PersistentDataset`` count it as deterministic and cache what follows it too."""

    def __init__(self, task: LabelTask):
        self.task = task

    def __call__(self, data):
        out = dict(data)
        out["label"] = self.task.encode(data["label"])
        return out


class ToPlainCase(Transform):
    """Last preprocessing step: plain tensors (image float32, label uint8) plus the affine as a float64 tensor, so
    that a cached case holds no MONAI metadata objects (``PersistentDataset`` then loads it with
    ``torch.load(weights_only=True)``)."""

    def __call__(self, data):
        from monai.data import MetaTensor

        img = data["image"]
        aff = img.affine if isinstance(img, MetaTensor) else torch.eye(4)
        plain = lambda t: t.as_tensor() if isinstance(t, MetaTensor) else torch.as_tensor(t)  # noqa: E731
        out = {k: v for k, v in data.items() if k not in ("image", "label", "image_meta_dict", "label_meta_dict")}
        out["image"] = plain(img).float().contiguous()
        out["label"] = plain(data["label"]).to(torch.uint8).contiguous()
        out["affine"] = torch.as_tensor(np.asarray(aff), dtype=torch.float64)
        return out


def preprocessing(task, spacing: float | None = None, min_size: tuple | None = None,
                  preprocess: Preprocess | dict | None = None):
    """MONAI pipeline: load, channel first, orientation, optional resampling, optional foreground crop, the task's
    label encoding, intensity normalisation, padding up to ``min_size``, plain tensors.

    ``task``: a :class:`LabelTask` or (older API) the foreground codes of a binary task; ``spacing`` (older API)
    fills ``preprocess.spacing`` when that is unset."""
    from monai.transforms import (
        Compose,
        CropForegroundd,
        EnsureChannelFirstd,
        EnsureTyped,
        LoadImaged,
        NormalizeIntensityd,
        Orientationd,
        ScaleIntensityRanged,
        Spacingd,
        SpatialPadd,
    )

    task = as_task(task)
    pre = preprocess if isinstance(preprocess, Preprocess) else Preprocess(**dict(preprocess or {}))
    if spacing and pre.spacing is None:
        pre = Preprocess(**{**pre.to_dict(), "spacing": spacing})
    keys = ("image", "label")
    steps = [LoadImaged(keys=keys, image_only=True), EnsureChannelFirstd(keys=keys)]
    if pre.orientation:
        steps.append(Orientationd(keys=keys, axcodes=pre.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))))
    if pre.spacing:
        steps.append(Spacingd(keys=keys, pixdim=tuple(pre.spacing), mode=("bilinear", "nearest")))
    if pre.crop_foreground:
        steps.append(CropForegroundd(keys=keys, source_key="image", margin=int(pre.margin), allow_smaller=True))
    steps += [EnsureTyped(keys=keys, dtype=torch.float32, track_meta=True), EncodeLabel(task)]
    if pre.intensity in ("nonzero_zscore", "zscore"):
        steps.append(NormalizeIntensityd(keys="image", nonzero=pre.intensity == "nonzero_zscore", channel_wise=True))
    elif pre.intensity == "window":
        a_min, a_max = (float(v) for v in pre.window)
        steps.append(ScaleIntensityRanged(keys="image", a_min=a_min, a_max=a_max, b_min=0.0, b_max=1.0, clip=True))
    if min_size:
        steps.append(SpatialPadd(keys=keys, spatial_size=tuple(min_size)))
    steps.append(ToPlainCase())
    return Compose(steps)


def to_case(item: dict, out: dict) -> Case:
    """A :class:`Case` from a case dict and its preprocessed form (output of :func:`preprocessing`)."""
    aff = np.asarray(out["affine"], dtype=np.float64)
    spac = tuple(float(s) for s in np.sqrt((aff[:3, :3] ** 2).sum(0)))
    return Case(str(item.get("id", item["image"])), out["image"], out["label"], spac, aff)


def load_cases(items: list, task, spacing: float | None = None, min_size: tuple | None = None,
               preprocess: Preprocess | dict | None = None) -> list:
    """Preprocess every case now and keep them all in memory: fine for a few cases (tests, a few-shot training
    set); :class:`peft_tensor.data.datasets.CaseSource` is the scalable form (cached, on disk, or loaded per use)."""
    pipe = preprocessing(task, spacing, min_size, preprocess)
    return [to_case(item, pipe({"image": item["image"], "label": item["label"]})) for item in items]


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


def step_picks(n_cases: int, step: int, global_batch: int, seed: int) -> np.ndarray:
    """Which cases (indices into the training set) make the global batch of ``step``."""
    return np.random.default_rng(seed_for(seed, "batch", step)).integers(0, n_cases, size=global_batch)


def draw_sample(cases, step: int, j: int, global_batch: int, seed: int, aug, softmax: bool = True):
    """Sample ``j`` of the global batch of ``step``: (image [C, *patch] float32, label) -- label [1, *patch] long
    for softmax tasks, [K, *patch] float for multi-label ones. ``cases`` is any sequence of :class:`Case` (a list
    or a :class:`peft_tensor.data.datasets.CaseSource`)."""
    case = cases[int(step_picks(len(cases), step, global_batch, seed)[j])]
    aug.set_random_state(seed=seed_for(seed, "aug", step, j))
    out = aug({"image": case.image, "label": case.label.float()})
    out = out[0] if isinstance(out, list) else out
    image = _plain(out["image"]).float()
    label = _plain(out["label"]).round()
    return image, (label.long() if softmax else label.float())


def _plain(t) -> torch.Tensor:
    return t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)


def sample_batch(cases, step: int, global_batch: int, seed: int, patch: tuple, rank: int = 0,
                 world_size: int = 1, aug=None, softmax: bool = True):
    """The slice of step ``step``'s global batch that belongs to ``rank``, drawn in this process (the recipes draw
    the same samples in DataLoader workers: :func:`peft_tensor.data.datasets.train_loader`).

    Returns (images [B, C, *patch], labels [B, 1 or K, *patch]) with B = global_batch // world_size."""
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} is not divisible by {world_size} processes")
    aug = aug or augmentation(patch)
    per_rank = global_batch // world_size
    pairs = [draw_sample(cases, step, j, global_batch, seed, aug, softmax)
             for j in range(rank * per_rank, (rank + 1) * per_rank)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
