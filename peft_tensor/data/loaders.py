"""Datasets by path, as lists of ``{"image", "label", "id"}`` dicts plus the segmentation task their labels make.

Every loader returns a :class:`DatasetSplits`: ``splits[name]`` is a list of case dicts (paths to NIfTI files),
``task`` the :class:`peft_tensor.data.labels.LabelTask` (binary / multi-class / multi-label, class names and the
label codes of each class). :mod:`peft_tensor.data.transforms` and :mod:`peft_tensor.data.datasets` turn the cases
into tensors.

Layouts (``data.kind``)
    * ``msd`` -- :func:`msd`: a Medical Segmentation Decathlon task folder (``dataset.json``, ``imagesTr/``,
      ``labelsTr/``), read with ``monai.data.load_decathlon_datalist``; the classes are ``dataset.json``'s labels
      (Task04 Hippocampus: anterior, posterior). The same works for any datalist in that format (BTCV's
      ``dataset_0.json``: 13 organs).
    * ``pairs`` -- :func:`pairs_folder`: a folder of ``<id>_img.nii.gz`` / ``<id>_mask.nii.gz`` pairs (the
      EADC-ADNI / LPBA40 / HFH layout of the papers, and the layout of the embedded cohort) with split files.
    * ``brats`` -- :func:`brats2021`: BraTS 2021 (``<case>/<case>_<modality>.nii.gz`` and ``<case>_seg.nii.gz``);
      binary whole tumour by default (the papers' pretraining), or the three regions tumour core / whole tumour /
      enhancing tumour (``task_type: multilabel``); one modality or several as input channels.
    * ``embedded`` -- :func:`embedded`: the template-derived default cohort (:mod:`peft_tensor.data.embedded`).
    * a dotted path ``package.module.function`` (or ``package.module:function``) -- the user's own loader, called
      with the remaining ``data`` keys; it returns a :class:`DatasetSplits` or a mapping ``{split: [case dicts]}``.

The task keys of a data config, for every kind: ``task_type`` (``binary`` | ``multiclass`` | ``multilabel``),
``classes`` (``{name: [label codes]}``, or a list of names the dataset's metadata knows) and, for binary tasks,
``foreground`` (the codes merged into the foreground). See :func:`peft_tensor.data.labels.make_task`.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from .labels import BRATS_REGIONS, LabelTask, as_task, make_task


@dataclass
class DatasetSplits:
    splits: dict  # split name -> list of {"image": str or [str, ...], "label": str, "id": str}
    task: LabelTask | tuple | None = None  # a LabelTask, or the foreground codes of a binary task (older API)
    description: str = ""
    extra: dict = field(default_factory=dict)
    label_names: dict = field(default_factory=dict)  # names -> codes the dataset's own metadata gives

    def __post_init__(self):
        self.task = as_task(self.task)

    def __getitem__(self, name: str) -> list:
        if name not in self.splits:
            raise KeyError(f"no split {name!r}; available: {sorted(self.splits)}")
        return self.splits[name]

    @property
    def foreground(self) -> tuple:
        """The label codes of the foreground (binary tasks; the union of every class's codes otherwise)."""
        return tuple(sorted({c for codes in self.task.codes for c in codes}))


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
    ``foreground``: the mask codes merged into the foreground of the default binary task; empty means every non-zero
    code. Multi-class masks: ``task_type: multiclass`` with ``classes: {name: [codes]}`` in the data config."""
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
    return DatasetSplits(splits, make_task("binary", foreground=tuple(foreground)), f"image/mask pairs in {root}")


def _class_name(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", str(name).strip().lower()).strip("_") or "class"


def msd(root: str | os.PathLike, datalist: str = "dataset.json", fractions: dict | None = None, seed: int = 0,
        datalist_keys: dict | None = None) -> DatasetSplits:
    """A Medical Segmentation Decathlon task folder (or any folder with a decathlon-format datalist), read with
    ``monai.data.load_decathlon_datalist``.

    ``datalist``: the JSON file (``dataset.json``; BTCV: ``dataset_0.json``). ``datalist_keys``: splits taken from
    the datalist's own lists, e.g. ``{train: training, val: validation}``; by default the labelled ``training`` list
    is split with ``fractions`` (seeded; default 60/20/20 train/val/test). The unlabelled ``test`` list is not used.
    The classes are the datalist's ``labels`` (Task04: ``{1: Anterior, 2: Posterior}`` -> classes anterior,
    posterior, a 2-class task); ``task_type: binary`` merges them into one foreground."""
    from monai.data import load_decathlon_datalist

    root = Path(root)
    meta_path = Path(datalist) if Path(datalist).is_absolute() else root / datalist
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: is {root} an MSD task folder (dataset.json, imagesTr/, "
                                "labelsTr/)? Set data.datalist for another datalist file name.")
    meta = json.loads(meta_path.read_text())

    def read(key):
        if key not in meta:
            lists = sorted(k for k, v in meta.items() if isinstance(v, list))
            raise KeyError(f"{meta_path} has no list {key!r}; it has {lists} (data.datalist_keys)")
        items = load_decathlon_datalist(meta_path, is_segmentation=True, data_list_key=key, base_dir=root)
        out = []
        for item in items:
            paths = item["image"] if isinstance(item["image"], list) else [item["image"]]
            missing = [p for p in [*paths, item["label"]] if not Path(p).is_file()]
            if missing:
                raise FileNotFoundError(f"{meta_path.name} ({key!r}) lists files that do not exist: {missing[:3]}")
            cid = Path(paths[0]).name.split(".nii")[0]
            out.append({"image": item["image"], "label": item["label"], "id": cid})
        return out

    if datalist_keys:
        splits = {str(name): read(key) for name, key in dict(datalist_keys).items()}
    else:
        cases = {c["id"]: c for c in read("training")}
        ids = _random_split(list(cases), fractions or {"train": 0.6, "val": 0.2, "test": 0.2}, seed)
        splits = {k: [cases[i] for i in v] for k, v in ids.items()}
    labels = {_class_name(v): (int(k),) for k, v in meta.get("labels", {}).items() if int(k) != 0}
    if not labels:
        raise ValueError(f"{meta_path} has no 'labels' besides background: give data.classes {{name: [codes]}}")
    task = make_task("multiclass", default_classes=labels) if len(labels) > 1 else \
        make_task("binary", classes=labels)
    name = meta.get("name", "MSD")
    return DatasetSplits(splits, task, f"{name} ({meta_path.name} in {root})", label_names=labels,
                         extra={"binary_name": _class_name(name)})


def msd_hippocampus(root: str | os.PathLike, fractions: dict | None = None, seed: int = 0) -> DatasetSplits:
    """Medical Segmentation Decathlon Task04_Hippocampus (:func:`msd`): labels 1 (anterior) and 2 (posterior) as
    two classes; ``task_type: binary`` in the data config merges them into the hippocampus, as the papers do."""
    return msd(root, fractions=fractions, seed=seed)


def brats2021(
    root: str | os.PathLike, modality: str | list = "flair", fractions: dict | None = None, seed: int = 0
) -> DatasetSplits:
    """BraTS 2021 training data: one folder per case ``BraTS2021_XXXXX/`` with ``<case>_<modality>.nii.gz`` and
    ``<case>_seg.nii.gz``. By default labels 1 (necrosis), 2 (oedema) and 4 (enhancing tumour) are merged into whole
    tumour, as in the papers' pretraining; ``task_type: multilabel`` gives MONAI's three BraTS regions (tumour core
    1|4, whole tumour 1|2|4, enhancing tumour 4: ``ConvertToMultiChannelBasedOnBratsClassesd``). ``modality``: one
    (``flair``) or a list (``[flair, t1, t1ce, t2]``: one input channel each, ``model.in_channels`` to match)."""
    root = Path(root)
    mods = [modality] if isinstance(modality, str) else list(modality)
    cases = {}
    for cid, seg, img in _paired_files(root, "seg", mods[0]):
        images = [str(img)] + [str(img.with_name(img.name.replace(f"_{mods[0]}.", f"_{m}."))) for m in mods[1:]]
        missing = [p for p in images if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"BraTS case {cid} lacks modality files {missing}")
        cases[cid] = {"image": images[0] if len(images) == 1 else images, "label": str(seg), "id": cid}
    if not cases:
        raise FileNotFoundError(f"no BraTS cases (<case>_seg.nii.gz with <case>_{mods[0]}.nii.gz) under {root}")
    ids = _random_split(list(cases), fractions or {"train": 0.8, "val": 0.1, "test": 0.1}, seed)
    task = make_task("binary", classes={"whole_tumour": BRATS_REGIONS["whole_tumour"]})
    names = {**BRATS_REGIONS, "necrosis": (1,), "oedema": (2,)}
    return DatasetSplits({k: [cases[i] for i in v] for k, v in ids.items()}, task, "BraTS 2021",
                         label_names=names, extra={"multilabel_classes": dict(BRATS_REGIONS)})


BRATS_WHOLE_TUMOUR = BRATS_REGIONS["whole_tumour"]
# the embedded cohort's tasks (data.task): pretraining, few-shot target, few-shot target under an acquisition shift
EMBEDDED_TASKS = ("source", "target", "target_shift")


def embedded(
    task: str = "target",
    n_source: int = 16,
    n_train: int = 5,
    n_val: int = 2,
    n_test: int = 8,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
    shift: dict | None = None,
    **spec_kwargs,
) -> DatasetSplits:
    """The template-derived cohort (built or completed in the cache on first use).

    ``task="source"``: other subcortical structures; splits ``train`` (all source subjects but two) and ``val``.
    ``task="target"``: hippocampus; splits ``train`` (the first ``n_train`` few-shot subjects), ``val``, ``test``.
    ``task="target_shift"``: the target task's subjects (same anatomy, same deformations, same splits) under an
    acquisition shift from the pretraining data -- by default T2-like contrast (tissue ordering of the T1 reversed),
    4.5 mm slices along the last axis, a 1.5x stronger bias field and Rician noise; ``shift`` (``data.shift`` in a
    config) overrides fields of :class:`peft_tensor.data.embedded.AcquisitionShift`: a contrast the pretrained
    encoder never saw, for measuring what adapting the encoder adds to the decoder (``benchmarks/shift_gap.py``)."""
    from dataclasses import asdict

    from .embedded import (
        HIPPOCAMPUS_LABELS,
        SOURCE_LABELS,
        AcquisitionShift,
        CohortSpec,
        build_cohort,
        subject_index,
    )

    if task not in EMBEDDED_TASKS:
        raise ValueError(f"data.task must be one of {', '.join(EMBEDDED_TASKS)} for data.kind=embedded, got {task!r}")
    if shift is not None and task != "target_shift":
        raise ValueError(f"data.shift describes the acquisition of data.task=target_shift, not of {task!r}: "
                         "set data.task=target_shift or remove data.shift")
    if task == "target_shift":
        spec_kwargs["shift"] = asdict(AcquisitionShift.from_config(shift))
        n_source = 0  # the pretraining subjects are never shifted
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
        fg = make_task("binary", classes={"subcortical": SOURCE_LABELS})
    else:
        splits = {r: cases(first(r, n)) for r, n in (("train", n_train), ("val", n_val), ("test", n_test))}
        fg = make_task("binary", classes={"hippocampus": HIPPOCAMPUS_LABELS})
    names = {"hippocampus": HIPPOCAMPUS_LABELS, "left_hippocampus": (17,), "right_hippocampus": (53,),
             "subcortical": SOURCE_LABELS}
    return DatasetSplits(splits, fg, meta["description"], {"folder": str(folder), "spacing": spec.spacing},
                         label_names=names)


LOADERS = {"embedded": embedded, "pairs": pairs_folder, "msd": msd, "brats": brats2021}
# keys of a data config that describe the task, the preprocessing and the loading, not the files: never passed to
# a loader function
TASK_KEYS = ("task_type", "classes", "foreground")
SETTINGS_KEYS = ("spacing_mm", "preprocess", "loader")


def resolve_loader(kind: str):
    """``data.kind`` -> the loader function: a built-in name, or a dotted path to a user's function
    (``package.module.function`` or ``package.module:function``)."""
    kind = str(kind)
    if kind in LOADERS:
        return LOADERS[kind]
    if "." not in kind and ":" not in kind:
        raise ValueError(f"unknown dataset kind {kind!r}; choose one of {sorted(LOADERS)} or give a dotted path to "
                         "your own loader function, e.g. data.kind=mypackage.data.load_my_scans")
    module_name, _, attr = kind.rpartition(":") if ":" in kind else kind.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"data.kind={kind!r}: cannot import module {module_name!r} ({e}); is it installed or on "
                         "PYTHONPATH?") from e
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise ValueError(f"data.kind={kind!r}: module {module_name!r} has no function {attr!r}")
    return fn


def _from_user(result, kind: str) -> DatasetSplits:
    if isinstance(result, DatasetSplits):
        return result
    if not isinstance(result, dict) or not all(isinstance(v, (list, tuple)) for v in result.values()):
        raise TypeError(f"data.kind={kind!r} returned {type(result).__name__}: a loader returns a DatasetSplits or a "
                        "mapping {split name: [{'image': path, 'label': path}, ...]}")
    splits = {}
    for name, items in result.items():
        cases = []
        for item in items:
            if not isinstance(item, dict) or "image" not in item or "label" not in item:
                raise TypeError(f"data.kind={kind!r}: split {name!r} holds {item!r}; every case is a dict with "
                                "'image' and 'label' paths (and optionally 'id')")
            first = item["image"][0] if isinstance(item["image"], (list, tuple)) else item["image"]
            cases.append({**item, "id": str(item.get("id", Path(str(first)).name.split(".nii")[0]))})
        splits[str(name)] = cases
    return DatasetSplits(splits, None, f"cases from {kind}")


def check_files(ds: DatasetSplits) -> None:
    """Every image and label file of every split exists (a clear error before any training starts)."""
    missing = []
    for name, items in ds.splits.items():
        for item in items:
            paths = item["image"] if isinstance(item["image"], (list, tuple)) else [item["image"]]
            missing += [(name, str(p)) for p in [*paths, item["label"]] if not Path(p).is_file()]
    if missing:
        shown = "; ".join(f"{s}: {p}" for s, p in missing[:5])
        raise FileNotFoundError(f"{len(missing)} file(s) named by the dataset do not exist ({shown}"
                                f"{' ...' if len(missing) > 5 else ''}): check data.root and the split lists")


def load_dataset(cfg: dict) -> DatasetSplits:
    """Dispatch on ``cfg["kind"]`` (a built-in layout or a dotted path to a loader function, see the module
    docstring); the other keys are the loader's arguments, except the task keys (``task_type``, ``classes``,
    ``foreground``) and the settings keys (``spacing_mm``, ``preprocess``, ``loader``), which every kind shares.
    The returned splits carry the task the config asks for and name only files that exist."""
    cfg = dict(cfg)
    kind = str(cfg.pop("kind", "embedded"))
    task_cfg = {k: cfg.pop(k) for k in TASK_KEYS if k in cfg}
    for k in SETTINGS_KEYS:
        cfg.pop(k, None)
    loader = resolve_loader(kind)
    if loader is pairs_folder and task_cfg.get("foreground") is not None:
        cfg["foreground"] = tuple(task_cfg["foreground"])
    if kind in LOADERS:  # a key another layout uses, left null in a config (e.g. split_files: null), is not set
        accepted = inspect.signature(loader).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
            cfg = {k: v for k, v in cfg.items() if k in accepted or v is not None}
            unknown = sorted(set(cfg) - set(accepted))
            if unknown:
                raise TypeError(f"data.kind={kind} does not take {unknown}; its arguments: {sorted(accepted)} "
                                f"(help(peft_tensor.data.loaders.{loader.__name__}))")
    ds = loader(**cfg)
    ds = _from_user(ds, kind) if kind not in LOADERS else ds
    ds.task = _configured_task(ds, task_cfg)
    check_files(ds)
    return ds


def _configured_task(ds: DatasetSplits, task_cfg: dict) -> LabelTask:
    task_type, classes, foreground = (task_cfg.get(k) for k in TASK_KEYS)
    if not task_type and classes is None and not foreground:
        return ds.task
    names = dict(ds.label_names) or ds.task.mapping
    default_type = ds.task.kind
    if task_type == "multilabel" and classes is None:
        classes = ds.extra.get("multilabel_classes")
    if task_type == "binary" and classes is None and not foreground:
        name = ds.task.classes[0] if ds.task.kind == "binary" else ds.extra.get("binary_name", "foreground")
        return make_task("binary", classes={name: [c for codes in ds.task.codes for c in codes]})
    if task_type and task_type != "binary" and classes is None and ds.task.kind == "binary":
        raise ValueError(f"data.task_type={task_type} needs data.classes ({{name: [label codes]}}): the dataset "
                         f"only defines the binary class {ds.task.mapping}")
    if classes is None:
        classes = ds.task.mapping
    return make_task(task_type, classes, default_classes=names, default_type=default_type,
                     foreground=tuple(foreground) if foreground else None)
