"""PNG plots with matplotlib (Agg backend): training curves and segmentation overlays."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .._atomic import atomic_write


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path) -> Path:
    """``fig`` as a PNG at ``path`` through the atomic writer: a symbolic link planted there is replaced, not written
    through, and a crash mid-write leaves the previous plot."""
    path = Path(path)
    # the format savefig(path) would choose: the temporary file's name ends in .tmp + path's suffixes
    fmt = path.suffix[1:].lower() or plt.rcParams["savefig.format"]
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format=fmt))
    finally:
        plt.close(fig)
    return path


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
    return _save(plt, fig, path)


def class_colours(n: int) -> list:
    """One colour per class (matplotlib's tab10 / tab20 qualitative maps)."""
    plt = _plt()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(k % cmap.N) for k in range(n)]


def plot_overlay(image, truth, pred, path, title: str = "", classes=None) -> Path:
    """Three orthogonal slices through the centre of the truth: the image with truth (solid) and prediction (dashed)
    contours. ``image`` [X, Y, Z] (or [C, X, Y, Z]: the first channel is shown); masks [X, Y, Z] (one class: truth
    green, prediction red) or [K, X, Y, Z] with ``classes`` their K names (one colour per class, legend)."""
    plt = _plt()
    image, truth, pred = (np.asarray(a) for a in (image, truth, pred))
    if image.ndim == 4:
        image = image[0]
    if truth.ndim == 3:
        truth, pred = truth[None], pred[None]
    names = list(classes) if classes is not None else [f"class {k + 1}" for k in range(truth.shape[0])]
    single = truth.shape[0] == 1
    colours = [("lime", "red")] if single else [(c, c) for c in class_colours(truth.shape[0])]
    union_t, union_p = truth.any(0), pred.any(0)
    idx = np.argwhere(union_t) if union_t.any() else np.argwhere(union_p) if union_p.any() else None
    c = idx.mean(0).round().astype(int) if idx is not None else np.array(image.shape) // 2
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.4 if single else 3.9))
    cut = [lambda a: a[..., c[0], :, :], lambda a: a[..., :, c[1], :], lambda a: a[..., :, :, c[2]]]
    for ax, sl, name in zip(axes, cut, ("sagittal", "coronal", "axial")):
        ax.imshow(np.rot90(sl(image)), cmap="gray")
        for k in range(truth.shape[0]):
            tr, pr = sl(truth[k]), sl(pred[k])
            if tr.any():
                ax.contour(np.rot90(tr.astype(float)), levels=[0.5], colors=[colours[k][0]], linewidths=1)
            if pr.any():
                ax.contour(np.rot90(pr.astype(float)), levels=[0.5], colors=[colours[k][1]], linewidths=1,
                           linestyles="dashed" if not single else "solid")
        ax.set_title(name)
        ax.axis("off")
    if single:
        fig.suptitle(title + "  (green: truth, red: prediction)")
    else:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=col[0], lw=2, label=n) for n, col in zip(names, colours)]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(names), 7), fontsize=7, frameon=False)
        fig.suptitle(title + "  (solid: truth, dashed: prediction)")
    fig.tight_layout(rect=(0, 0.06 if not single else 0, 1, 1))
    return _save(plt, fig, path)




def plot_extremes(items, folder, prefix: str = "", task=None) -> list:
    """Overlays ``<prefix>overlay_<tag>.png`` of ``(tag, case, prediction, row)`` items
    (:meth:`peft_tensor.training.loop.Extremes.items`). Returns the written paths."""
    out = []
    for tag, case, pred, row in (items.items() if hasattr(items, "items") else items):
        truth = task.masks(case.label) if task is not None else np.asarray(case.label[0]).astype(bool)
        prd = task.masks(pred) if task is not None else np.asarray(pred).astype(bool)
        out.append(plot_overlay(case.image.numpy(), truth, prd, Path(folder) / f"{prefix}overlay_{tag}.png",
                                f"{tag}: {case.id}  Dice {row['dice']:.3f}",
                                classes=task.classes if task is not None else None))
    return out
