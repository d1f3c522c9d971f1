"""PNG plots with matplotlib (Agg backend): training curves and segmentation overlays."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_curves(rows: list, path, title: str = "") -> Path:
    """Training loss and validation Dice against step, from logged rows (``step``, ``loss``, ``val_dice``)."""
    plt = _plt()
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    tr = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    va = [(r["step"], r["val_dice"]) for r in rows if r.get("val_dice") is not None]
    if tr:
        ax[0].plot(*zip(*tr), lw=0.8)
    ax[0].set(xlabel="step", ylabel="training loss", title="loss")
    if va:
        ax[1].plot(*zip(*va), marker="o")
    ax[1].set(xlabel="step", ylabel="Dice", title="validation Dice", ylim=(0, 1))
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_overlay(image, truth, pred, path, title: str = "") -> Path:
    """Three orthogonal slices through the centre of the truth: image, truth (green) and prediction (red)
    contours. ``image`` [X, Y, Z], masks [X, Y, Z]."""
    plt = _plt()
    image, truth, pred = (np.asarray(a) for a in (image, truth, pred))
    idx = np.argwhere(truth) if truth.any() else np.argwhere(pred) if pred.any() else None
    c = idx.mean(0).round().astype(int) if idx is not None else np.array(image.shape) // 2
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.4))
    views = [(image[c[0]], truth[c[0]], pred[c[0]], "sagittal"),
             (image[:, c[1]], truth[:, c[1]], pred[:, c[1]], "coronal"),
             (image[:, :, c[2]], truth[:, :, c[2]], pred[:, :, c[2]], "axial")]
    for ax, (im, tr, pr, name) in zip(axes, views):
        ax.imshow(np.rot90(im), cmap="gray")
        if tr.any():
            ax.contour(np.rot90(tr.astype(float)), levels=[0.5], colors="lime", linewidths=1)
        if pr.any():
            ax.contour(np.rot90(pr.astype(float)), levels=[0.5], colors="red", linewidths=1)
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title + "  (green: truth, red: prediction)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_best_worst(cases: list, preds: list, rows: list, folder, prefix: str = "") -> list:
    """Overlays of the best and worst case by Dice. Returns the written paths."""
    if not rows:
        return []
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["dice"] if rows[i]["dice"] == rows[i]["dice"] else -1))
    out = []
    for tag, i in (("worst", order[0]), ("best", order[-1])):
        case = cases[i]
        out.append(plot_overlay(case.image[0].numpy(), case.label[0].numpy(), preds[i].numpy(),
                                Path(folder) / f"{prefix}overlay_{tag}.png",
                                f"{tag}: {case.id}  Dice {rows[i]['dice']:.3f}"))
    return out
