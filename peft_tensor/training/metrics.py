"""Segmentation metrics per case, with MONAI: Dice, HD95 (the 95th percentile of the symmetric surface
distances, in mm -- not the maximum), Jaccard (MeanIoU), and volume in mL. Optionally also after removing
connected components smaller than ``min_component_voxels``, reported under separate ``*_cc`` keys (the authors'
public evaluation removes components < 1000 voxels before computing Dice; that is not the standard metric).

Several classes (:func:`task_case_metrics`): every metric per class under ``<metric>:<class>`` and, under the plain
``<metric>`` key, the mean over the classes of the case (classes where the metric is undefined left out); for one
class the row is exactly :func:`case_metrics`'s. :func:`summarize` then gives the summary over classes,
:func:`summarize_per_class` one summary per class."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch


def remove_small_components(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """Binary ``mask`` without its 26-connected components of fewer than ``min_voxels`` voxels."""
    from scipy import ndimage

    mask = np.asarray(mask).astype(bool)
    lab, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[lab]


def _onehot(mask: torch.Tensor) -> torch.Tensor:
    m = torch.as_tensor(mask).bool()
    while m.dim() < 3:
        m = m[None]
    m = m.reshape(m.shape[-3:]) if m.dim() > 3 else m
    return torch.stack([~m, m]).float()[None]  # [1, 2, X, Y, Z]


def case_metrics(pred, truth, spacing=(1.0, 1.0, 1.0), min_component_voxels: int = 0) -> dict:
    """Metrics of one binary prediction against one binary truth (arrays [X, Y, Z] or [1, X, Y, Z]).

    ``hd95`` is ``nan`` when either mask is empty (undefined), ``dice``/``jaccard`` follow MONAI with
    ``ignore_empty=False`` (empty truth: 1 for an empty prediction, 0 otherwise)."""
    from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU

    def compute(p):
        yp, yt = _onehot(p), _onehot(truth)
        dice = DiceMetric(include_background=False, reduction="none", ignore_empty=False)(yp, yt)
        iou = MeanIoU(include_background=False, reduction="none", ignore_empty=False)(yp, yt)
        if yp[:, 1].sum() == 0 or yt[:, 1].sum() == 0:
            hd = float("nan")
        else:
            with warnings.catch_warnings():  # MONAI's own call of its deprecated argument, at every case
                warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
                hd = float(HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(
                    yp, yt, spacing=list(spacing)).item())
        return float(dice.item()), hd, float(iou.item())

    p = np.asarray(torch.as_tensor(pred).cpu()).astype(bool).reshape(np.asarray(truth).shape[-3:])
    t = np.asarray(torch.as_tensor(truth).cpu()).astype(bool).reshape(p.shape)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    dice, hd, iou = compute(p)
    out = {"dice": dice, "hd95": hd, "jaccard": iou, "volume_ml": float(p.sum()) * voxel_ml,
           "true_volume_ml": float(t.sum()) * voxel_ml}
    if min_component_voxels:
        pc = remove_small_components(p, min_component_voxels)
        dice, hd, iou = compute(pc)
        out.update({"dice_cc": dice, "hd95_cc": hd, "jaccard_cc": iou, "volume_ml_cc": float(pc.sum()) * voxel_ml})
    return out


def summarize(rows: list, keys=("dice", "hd95", "jaccard", "volume_ml", "dice_cc", "hd95_cc")) -> dict:
    """Mean, std and count of the finite values of each key over the cases."""
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if k in r and r[k] is not None and math.isfinite(r[k])]
        if vals or any(k in r for r in rows):
            out[k] = {"mean": float(np.mean(vals)) if vals else float("nan"),
                      "std": float(np.std(vals)) if vals else float("nan"), "n": len(vals)}
    return out




def task_case_metrics(pred_masks, truth_masks, classes, spacing=(1.0, 1.0, 1.0),
                      min_component_voxels: int = 0) -> dict:
    """Metrics of one case with K classes: ``pred_masks`` and ``truth_masks`` are boolean [K, X, Y, Z] (see
    :meth:`peft_tensor.data.LabelTask.masks`), ``classes`` their K names.

    One class: :func:`case_metrics`'s row. Several: ``<metric>:<class>`` per class, the plain ``<metric>`` the mean
    over the classes with a finite value, and ``fg_volume_ml`` / ``true_fg_volume_ml`` the volume of the union of
    the classes (e.g. the whole hippocampus of an anterior / posterior labelling)."""
    pred_masks, truth_masks = np.asarray(pred_masks, bool), np.asarray(truth_masks, bool)
    if pred_masks.shape != truth_masks.shape or pred_masks.shape[0] != len(classes):
        raise ValueError(f"prediction {pred_masks.shape} and truth {truth_masks.shape} must both be "
                         f"[{len(classes)}, X, Y, Z] for classes {list(classes)}")
    if len(classes) == 1:
        return case_metrics(pred_masks[0], truth_masks[0], spacing, min_component_voxels)
    per = [case_metrics(p, t, spacing, min_component_voxels) for p, t in zip(pred_masks, truth_masks)]
    row = {}
    for key in per[0]:
        vals = [m[key] for m in per if m[key] is not None and math.isfinite(m[key])]
        row[key] = float(np.mean(vals)) if vals else float("nan")
    voxel_ml = float(np.prod(spacing)) / 1000.0
    row["fg_volume_ml"] = float(pred_masks.any(0).sum()) * voxel_ml
    row["true_fg_volume_ml"] = float(truth_masks.any(0).sum()) * voxel_ml
    for name, m in zip(classes, per):
        row.update({f"{k}:{name}": v for k, v in m.items()})
    return row


def summarize_per_class(rows: list, classes, keys=("dice", "hd95", "jaccard", "volume_ml", "dice_cc",
                                                   "hd95_cc")) -> dict:
    """``{class: summarize(...)}`` of rows from :func:`task_case_metrics` (one class: the plain keys)."""
    classes = list(classes)
    if len(classes) == 1:
        return {classes[0]: summarize(rows, keys)}
    out = {}
    for name in classes:
        renamed = [{k: r[f"{k}:{name}"] for k in keys if f"{k}:{name}" in r} for r in rows]
        out[name] = summarize(renamed, keys)
    return out
