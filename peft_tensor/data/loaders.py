"""Datasets by path, as lists of ``{"image", "label", "id"}`` dicts plus the label codes that make the foreground.

Every loader returns a :class:`DatasetSplits`: ``splits[name]`` is a list of case dicts (paths to NIfTI files),
``foreground`` the label codes merged into the binary foreground. :func:`peft_tensor.data.transforms` turns the
cases into tensors.

Layouts
    * :func:`msd_hippocampus` -- Medical Segmentation Decathlon Task04 (``dataset.json``, ``imagesTr/``,
      ``labelsTr/``; labels 1 anterior, 2 posterior -> hippocampus).
    * :func:`pairs_folder` -- a folder of ``<id>_img.nii.gz`` / ``<id>_mask.nii.gz`` pairs (the EADC-ADNI / LPBA40 /
      HFH layout of the papers, and the layout of the embedded cohort) with split files.
    * :func:`brats2021` -- BraTS 2021 (``<case>/<case>_<modality>.nii.gz`` and ``<case>_seg.nii.gz``); labels 1, 2, 4
      merged into whole tumour, one modality as the single input channel (FLAIR by default).
    * :func:`embedded` -- the template-derived default cohort (:mod:`peft_tensor.data.embedded`).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class DatasetSplits:
    splits: dict  # split name -> list of {"image": str, "label": str, "id": str}
    foreground: tuple  # label codes merged into the foreground class
    description: str = ""
    extra: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> list:
        if name not in self.splits:
            raise KeyError(f"no split {name!r}; available: {sorted(self.splits)}")
        return self.splits[name]



def _paired_files(root: Path, anchor: str, partner: str):
    """``(case id, <id>_<anchor>.nii*, <id>_<partner>.nii*)`` for every anchor file under ``root`` whose partner
    (same folder, same extension) exists, sorted by path."""
    for path in sorted(root.rglob(f"*_{anchor}.nii*")):
        cid = path.name.split(f"_{anchor}.nii")[0]
        ext = path.name.split(f"_{anchor}")[1]
        other = path.with_name(f"{cid}_{partner}{ext}")
        if other.is_file():
            yield cid, path, other

def _random_split(ids: list, fractions: dict, seed: int) -> dict:
    ids = sorted(ids)
    random.Random(seed).shuffle(ids)
    out, start = {}, 0
    names = list(fractions)
    for i, name in enumerate(names):
        n = len(ids) - start if i == len(names) - 1 else int(round(fractions[name] * len(ids)))
        out[name] = sorted(ids[start : start + n])
        start += n
    return out


def read_split_file(path: str | os.PathLike) -> dict:
    """A JSON file ``{"train": [ids], "val": [...], "test": [...]}``, or a text file of ids (one split, named after
    the file stem)."""
    path = Path(path)
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        return {str(k): [str(i) for i in v] for k, v in data.items()}
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return {path.stem: ids}


def pairs_folder(
    root: str | os.PathLike,
    split_files: list | str | None = None,
    foreground: tuple = (),
    fractions: dict | None = None,
    seed: int = 0,
) -> DatasetSplits:
    """``<id>_img.nii.gz`` / ``<id>_mask.nii.gz`` pairs in ``root`` (searched recursively).

    Splits come from ``split_files`` (JSON or text files, paths relative to ``root`` allowed), else from
    ``root/splits.json`` if present, else a seeded random split with ``fractions`` (default 60/20/20 train/val/test).
    ``foreground``: the mask codes merged into the foreground; empty means every non-zero code."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    cases = {cid: {"image": str(img), "label": str(mask), "id": cid}
             for cid, img, mask in _paired_files(root, "img", "mask")}
    if not cases:
        raise FileNotFoundError(f"no <id>_img.nii.gz / <id>_mask.nii.gz pairs under {root}")
    if isinstance(split_files, (str, os.PathLike)):
        split_files = [split_files]
    if not split_files and (root / "splits.json").is_file():
        split_files = [root / "splits.json"]
    if split_files:
        ids = {}
        for f in split_files:
            f = Path(f)
            ids.update(read_split_file(f if f.is_absolute() or f.exists() else root / f))
    else:
        ids = _random_split(list(cases), fractions or {"train": 0.6, "val": 0.2, "test": 0.2}, seed)
    splits = {}
    for name, members in ids.items():
        missing = [m for m in members if m not in cases]
        if missing:
            raise FileNotFoundError(f"split {name!r} names cases without an image/mask pair in {root}: {missing[:5]}")
        splits[name] = [cases[m] for m in members]
    return DatasetSplits(splits, tuple(foreground), f"image/mask pairs in {root}")


def msd_hippocampus(root: str | os.PathLike, fractions: dict | None = None, seed: int = 0) -> DatasetSplits:
    """Medical Segmentation Decathlon Task04_Hippocampus: ``dataset.json`` lists the labelled ``training`` cases
    (``imagesTr/hippocampus_XXX.nii.gz``, ``labelsTr/...``); labels 1 (anterior) and 2 (posterior) are merged.
    The unlabelled ``test`` cases are not used; labelled cases are split with ``fractions`` (seeded)."""
    root = Path(root)
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: is {root} an MSD task folder?")
    meta = json.loads(meta_path.read_text())
    cases = {}
    for item in meta.get("training", []):
        img = root / item["image"]
        lab = root / item["label"]
        if not img.is_file() or not lab.is_file():
            raise FileNotFoundError(f"dataset.json lists {item} but the files are missing under {root}")
        cid = Path(item["image"]).name.split(".nii")[0]
        cases[cid] = {"image": str(img), "label": str(lab), "id": cid}
    ids = _random_split(list(cases), fractions or {"train": 0.6, "val": 0.2, "test": 0.2}, seed)
    labels = meta.get("labels", {})
    fg = tuple(int(k) for k in labels if int(k) != 0) or (1, 2)
    return DatasetSplits({k: [cases[i] for i in v] for k, v in ids.items()}, fg, meta.get("name", "MSD"))


BRATS_WHOLE_TUMOUR = (1, 2, 4)


def brats2021(
    root: str | os.PathLike, modality: str = "flair", fractions: dict | None = None, seed: int = 0
) -> DatasetSplits:
    """BraTS 2021 training data: one folder per case ``BraTS2021_XXXXX/`` with ``<case>_<modality>.nii.gz`` and
    ``<case>_seg.nii.gz``. Labels 1 (necrosis), 2 (oedema) and 4 (enhancing tumour) are merged into whole tumour,
    as in the papers' pretraining."""
    root = Path(root)
    cases = {cid: {"image": str(img), "label": str(seg), "id": cid}
             for cid, seg, img in _paired_files(root, "seg", modality)}
    if not cases:
        raise FileNotFoundError(f"no BraTS cases (<case>_seg.nii.gz with <case>_{modality}.nii.gz) under {root}")
    ids = _random_split(list(cases), fractions or {"train": 0.8, "val": 0.1, "test": 0.1}, seed)
    return DatasetSplits({k: [cases[i] for i in v] for k, v in ids.items()}, BRATS_WHOLE_TUMOUR, "BraTS 2021")


def embedded(
    task: str = "target",
    n_source: int = 16,
    n_train: int = 5,
    n_val: int = 2,
    n_test: int = 8,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
    **spec_kwargs,
) -> DatasetSplits:
    """The template-derived cohort (built or completed in the cache on first use).

    ``task="source"``: other subcortical structures; splits ``train`` (all source subjects but two) and ``val``.
    ``task="target"``: hippocampus; splits ``train`` (the first ``n_train`` few-shot subjects), ``val``, ``test``."""
    from .embedded import HIPPOCAMPUS_LABELS, SOURCE_LABELS, CohortSpec, build_cohort, subject_index

    spec = CohortSpec(**spec_kwargs)
    folder = build_cohort(n_source, n_train, n_val, n_test, spec=spec, cache_dir=cache_dir, progress=progress)
    meta = json.loads((folder / "cohort.json").read_text())

    def cases(ids):
        return [{"image": str(folder / f"{i}_img.nii.gz"), "label": str(folder / f"{i}_mask.nii.gz"), "id": i}
                for i in ids]

    def first(role, n):  # the cases of the first n subjects of a role (two per subject for "hemispheres")
        return [i for i in meta["splits"][role] if subject_index(i) < n]

    if task == "source":
        n_hold = min(2, max(n_source - 1, 0))
        src = first("source", n_source)
        splits = {"train": cases([i for i in src if subject_index(i) < n_source - n_hold]),
                  "val": cases([i for i in src if subject_index(i) >= n_source - n_hold])}
        fg = SOURCE_LABELS
    elif task == "target":
        splits = {r: cases(first(r, n)) for r, n in (("train", n_train), ("val", n_val), ("test", n_test))}
        fg = HIPPOCAMPUS_LABELS
    else:
        raise ValueError(f"task must be 'source' or 'target', got {task!r}")
    return DatasetSplits(splits, fg, meta["description"], {"folder": str(folder), "spacing": spec.spacing})


def load_dataset(cfg: dict) -> DatasetSplits:
    """Dispatch on ``cfg["kind"]``: ``embedded`` | ``pairs`` | ``msd`` | ``brats``; other keys are the loader's
    arguments (``root`` for the path-based ones)."""
    cfg = dict(cfg)
    kind = cfg.pop("kind", "embedded")
    cfg.pop("spacing_mm", None)
    loaders = {"embedded": embedded, "pairs": pairs_folder, "msd": msd_hippocampus, "brats": brats2021}
    if kind not in loaders:
        raise ValueError(f"unknown dataset kind {kind!r}; choose one of {sorted(loaders)}")
    if "foreground" in cfg and cfg["foreground"] is not None:
        cfg["foreground"] = tuple(cfg["foreground"])
    fg_override = cfg.pop("foreground", None) if kind != "pairs" else None
    ds = loaders[kind](**cfg)
    if fg_override:
        ds.foreground = tuple(fg_override)
    return ds
