"""What a label map means: the segmentation task (binary, multi-class softmax, multi-label sigmoid) and its classes.

A :class:`LabelTask` names the foreground classes and, for each, the label codes of the files that make it:

* ``binary``     -- one class; its codes are merged into the foreground (the papers' hippocampus / whole tumour).
                    Network output: 2 channels (background, foreground), softmax.
* ``multiclass`` -- K mutually exclusive classes (MSD Task04: anterior, posterior; a BTCV-style 13-organ layout).
                    Network output: K + 1 channels (background first), softmax; the label is a class-index map.
* ``multilabel`` -- K possibly overlapping regions (BraTS tumour core / whole tumour / enhancing tumour, as MONAI's
                    ``ConvertToMultiChannelBasedOnBratsClassesd``). Network output: K channels, one sigmoid each; the
                    label has K binary channels.

Binary is the one-class special case of ``multiclass``: the same loss, the same argmax, the same metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

TASK_TYPES = ("binary", "multiclass", "multilabel")

# BraTS regions from the labels 1 (necrotic core), 2 (oedema), 4 (enhancing tumour): MONAI's
# ConvertToMultiChannelBasedOnBratsClassesd, in its channel order (TC, WT, ET).
BRATS_REGIONS = {"tumour_core": (1, 4), "whole_tumour": (1, 2, 4), "enhancing_tumour": (4,)}
# The 13 abdominal organs of BTCV (Synapse multi-organ), codes 1..13 as in its dataset_0.json.
BTCV_ORGANS = ("spleen", "right_kidney", "left_kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
               "inferior_vena_cava", "portal_and_splenic_vein", "pancreas", "right_adrenal_gland",
               "left_adrenal_gland")


@dataclass(frozen=True)
class LabelTask:
    """``kind`` (one of :data:`TASK_TYPES`), ``classes`` (foreground class names, in channel order) and ``codes``
    (per class, the label-file codes that make it; an empty tuple in a binary task means every non-zero code)."""

    kind: str
    classes: tuple
    codes: tuple

    def __post_init__(self):
        if self.kind not in TASK_TYPES:
            raise ValueError(f"data.task_type must be one of {', '.join(TASK_TYPES)}, got {self.kind!r}")
        if not self.classes:
            raise ValueError("a segmentation task needs at least one foreground class (data.classes)")
        if len(self.classes) != len(self.codes):
            raise ValueError(f"{len(self.classes)} class names but {len(self.codes)} code lists")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"class names must be unique, got {list(self.classes)}")
        if self.kind == "binary" and len(self.classes) != 1:
            raise ValueError(f"a binary task has one foreground class, got {list(self.classes)}: use "
                             "data.task_type=multiclass (exclusive classes) or multilabel (overlapping regions)")
        if self.kind != "binary" and any(not c for c in self.codes):
            raise ValueError(f"every class of a {self.kind} task needs its label codes, got {self.mapping}")
        if self.kind == "multiclass":
            seen = {}
            for name, codes in zip(self.classes, self.codes):
                for c in codes:
                    if c in seen:
                        raise ValueError(f"label code {c} is in classes {seen[c]!r} and {name!r}: multiclass "
                                         "classes are exclusive; use data.task_type=multilabel for overlapping "
                                         "regions")
                    seen[c] = name

    @property
    def mapping(self) -> dict:
        return {n: list(c) for n, c in zip(self.classes, self.codes)}

    @property
    def softmax(self) -> bool:
        """Whether the network's channels are mutually exclusive (background + classes, softmax / argmax)."""
        return self.kind != "multilabel"

    @property
    def out_channels(self) -> int:
        """Output channels the network must have: K + 1 (softmax, background first) or K (sigmoid)."""
        return len(self.classes) + (1 if self.softmax else 0)

    @property
    def label_channels(self) -> int:
        """Channels of the preprocessed label: 1 (class-index map) or K (binary region masks)."""
        return 1 if self.softmax else len(self.classes)

    def describe(self) -> str:
        names = ", ".join(self.classes)
        return {"binary": f"binary ({names})", "multiclass": f"{len(self.classes)}-class softmax ({names})",
                "multilabel": f"{len(self.classes)}-region sigmoid ({names})"}[self.kind]

    def to_dict(self) -> dict:
        return {"task_type": self.kind, "classes": self.mapping}

    # ------------------------------------------------------------ label maps
    def encode(self, label: torch.Tensor) -> torch.Tensor:
        """Raw label codes [1, X, Y, Z] -> training label: class indices [1, X, Y, Z] (0 = background) for softmax
        tasks, K binary channels [K, X, Y, Z] for multi-label ones; uint8."""
        lab = torch.round(torch.as_tensor(label))
        if lab.dim() == 4 and lab.shape[0] != 1:
            raise ValueError(f"expected a one-channel label map [1, X, Y, Z], got shape {tuple(lab.shape)}")
        if self.kind == "binary" and not self.codes[0]:
            return (lab != 0).to(torch.uint8)
        masks = [_isin(lab, codes) for codes in self.codes]
        if not self.softmax:
            return torch.cat(masks, 0).to(torch.uint8)
        out = torch.zeros_like(lab, dtype=torch.uint8)
        for k, m in enumerate(masks, start=1):
            out[m] = k
        return out

    def masks(self, label) -> np.ndarray:
        """A training label or a prediction (class-index map [X, Y, Z] / [1, X, Y, Z], or K channels [K, X, Y, Z])
        -> K boolean masks [K, X, Y, Z], one per class."""
        arr = np.asarray(torch.as_tensor(label).cpu())
        if self.softmax:
            arr = arr.reshape(arr.shape[-3:])
            return np.stack([arr == k for k in range(1, len(self.classes) + 1)])
        if arr.shape[0] != len(self.classes):
            raise ValueError(f"a multi-label map needs {len(self.classes)} channels, got shape {arr.shape}")
        return arr.astype(bool)


def _isin(lab: torch.Tensor, codes) -> torch.Tensor:
    return torch.isin(lab, torch.as_tensor([float(c) for c in codes], dtype=lab.dtype))


def _codes(value) -> tuple:
    if isinstance(value, (int, float, np.integer)):
        return (int(value),)
    return tuple(int(v) for v in value)


def make_task(task_type: str | None = None, classes=None, default_classes=None, default_type: str = "binary",
              foreground=None) -> LabelTask:
    """The task of a data config.

    ``classes``: a mapping ``{name: code or [codes]}``, or a list of names (their codes taken from
    ``default_classes``, a loader's mapping such as MSD's ``dataset.json`` labels, else 1..K in order).
    ``foreground`` (the binary tasks' older key): the codes merged into the one class. ``task_type`` defaults to
    ``default_type``; a binary task given several classes merges them all into one foreground class."""
    kind = str(task_type or default_type).lower()
    if kind not in TASK_TYPES:
        raise ValueError(f"data.task_type must be one of {', '.join(TASK_TYPES)}, got {task_type!r}")
    defaults = {str(k): _codes(v) for k, v in dict(default_classes or {}).items()}
    if classes is None:
        mapping = dict(defaults)
    elif isinstance(classes, dict):
        mapping = {str(k): _codes(v) for k, v in classes.items()}
    elif isinstance(classes, (list, tuple)):
        names = [str(c) for c in classes]
        if all(n in defaults for n in names):
            mapping = {n: defaults[n] for n in names}
        else:
            mapping = {n: (k,) for k, n in enumerate(names, start=1)}
    else:
        raise ValueError(f"data.classes must be a mapping {{name: codes}} or a list of names, got {classes!r}")
    if kind == "binary":
        if foreground:
            codes = _codes(foreground)
        else:
            codes = tuple(sorted({c for v in mapping.values() for c in v}))
        name = next(iter(mapping)) if len(mapping) == 1 else "foreground"
        return LabelTask("binary", (name,), (codes,))
    if not mapping:
        raise ValueError(f"data.task_type={kind} needs data.classes: a mapping {{name: [label codes]}}, e.g. "
                         "{anterior: [1], posterior: [2]}")
    return LabelTask(kind, tuple(mapping), tuple(mapping.values()))


def as_task(task_or_foreground) -> LabelTask:
    """A :class:`LabelTask` as given, or the binary task of a tuple of foreground codes (the older API)."""
    if isinstance(task_or_foreground, LabelTask):
        return task_or_foreground
    return make_task("binary", foreground=tuple(task_or_foreground or ()))
