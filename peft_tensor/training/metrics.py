"""Segmentation metrics per case, with MONAI: Dice, HD95 (the 95th percentile of the symmetric surface
distances, in mm -- not the maximum), Jaccard (MeanIoU), and volume in mL. Optionally also after removing
connected components smaller than ``min_component_voxels``, reported under separate ``*_cc`` keys (the authors'
public evaluation removes components < 1000 voxels before computing Dice; that is not the standard metric)."""

from __future__ import annotations

import math

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

    ``hd95`` is ``nan`` when either mask is empty (undefined), ``dice``/``jaccard`` follow MONAI (empty truth and
    empty prediction count as nan)."""
    from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU

    def compute(p):
        yp, yt = _onehot(p), _onehot(truth)
        dice = DiceMetric(include_background=False, reduction="none", ignore_empty=False)(yp, yt)
        iou = MeanIoU(include_background=False, reduction="none", ignore_empty=False)(yp, yt)
        if yp[:, 1].sum() == 0 or yt[:, 1].sum() == 0:
            hd = float("nan")
        else:
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
