"""Downstream use of the segmentations: hippocampal volume (+ metadata) -> diagnosis, cross-validated.

HyPS uses hippocampal volumes from its segmentations plus metadata to classify AD vs CN and EMCI vs LMCI on ADNI;
its classifier is not published. Here: L2-regularised logistic regression (Newton / IRLS, numpy only), features
standardised on each training fold, stratified k-fold cross-validation.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np


def read_csv_rows(path) -> list:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def logistic_fit(x: np.ndarray, y: np.ndarray, l2: float = 1.0, iters: int = 50) -> np.ndarray:
    """Weights (bias first) of L2-penalised logistic regression by Newton's method. ``x`` [n, d], ``y`` in {0,1}."""
    xb = np.hstack([np.ones((len(x), 1)), x])
    w = np.zeros(xb.shape[1])
    pen = np.full(xb.shape[1], l2)
    pen[0] = 0.0
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-xb @ w))
        grad = xb.T @ (p - y) + pen * w
        hess = (xb * (p * (1 - p))[:, None]).T @ xb + np.diag(pen) + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def logistic_predict(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(np.hstack([np.ones((len(x), 1)), x]) @ w)))


def stratified_folds(y: np.ndarray, k: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    folds = [[] for _ in range(k)]
    for cls in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == cls))
        for i, j in enumerate(idx):
            folds[i % k].append(int(j))
    return [np.array(sorted(f)) for f in folds]


def cross_validate(x: np.ndarray, y: np.ndarray, k: int = 5, seed: int = 0, l2: float = 1.0) -> dict:
    """Stratified k-fold accuracy and balanced accuracy (mean and std over folds)."""
    acc, bacc = [], []
    for test_idx in stratified_folds(y, k, seed):
        train_idx = np.setdiff1d(np.arange(len(y)), test_idx)
        mu, sd = x[train_idx].mean(0), x[train_idx].std(0) + 1e-12
        w = logistic_fit((x[train_idx] - mu) / sd, y[train_idx], l2)
        pred = logistic_predict(w, (x[test_idx] - mu) / sd) >= 0.5
        truth = y[test_idx].astype(bool)
        acc.append(float((pred == truth).mean()))
        recalls = [float((pred[truth == c] == c).mean()) for c in (False, True) if (truth == c).any()]
        bacc.append(float(np.mean(recalls)))
    return {"accuracy": float(np.mean(acc)), "accuracy_std": float(np.std(acc)),
            "balanced_accuracy": float(np.mean(bacc)), "balanced_accuracy_std": float(np.std(bacc)),
            "folds": k, "n": int(len(y)), "n_positive": int(y.sum())}


def encode_features(rows: list, features: list) -> np.ndarray:
    """Numeric columns as floats; ``sex`` as 1 for M/male/1, 0 otherwise."""
    cols = []
    for f in features:
        if f == "sex":
            cols.append([1.0 if str(r[f]).strip().lower() in ("m", "male", "1") else 0.0 for r in rows])
        else:
            cols.append([float(r[f]) for r in rows])
    return np.array(cols, dtype=float).T


def synthetic_metadata(n_per_group: int = 60, seed: int = 0) -> list:
    """SYNTHETIC subjects for the demo of this recipe -- not ADNI, not real measurements. Bilateral hippocampal
    volume (mL) is drawn per group with an illustrative ordering CN > EMCI > LMCI > AD, lowered with age and
    raised for males; the numbers are made up to exercise the pipeline."""
    rng = np.random.default_rng(seed)
    means = {"CN": 7.0, "EMCI": 6.6, "LMCI": 6.2, "AD": 5.5}
    rows = []
    for group, mean in means.items():
        for i in range(n_per_group):
            age = float(rng.normal(74, 6))
            sex = "M" if rng.random() < 0.5 else "F"
            icv = float(rng.normal(1500 if sex == "M" else 1350, 100))
            vol = mean - 0.03 * (age - 74) + 0.25 * (sex == "M") + float(rng.normal(0, 0.55))
            rows.append({"id": f"synthetic_{group}_{i:03d}", "group": group, "age": round(age, 1), "sex": sex,
                         "icv_ml": round(icv, 1), "volume_ml": round(vol, 3)})
    return rows


def diagnose(rows: list, tasks: list, features: list, k: int = 5, seed: int = 0, l2: float = 1.0) -> dict:
    """For each task ``[negative_group, positive_group]``, cross-validated accuracy on the rows of those groups."""
    out = {}
    for neg, pos in tasks:
        sub = [r for r in rows if r["group"] in (neg, pos)]
        if len(sub) < 2 * k or len({r["group"] for r in sub}) < 2:
            out[f"{pos} vs {neg}"] = {"error": f"needs both groups and at least {2 * k} subjects, got {len(sub)}"}
            continue
        x = encode_features(sub, features)
        y = np.array([r["group"] == pos for r in sub], dtype=float)
        res = cross_validate(x, y, k, seed, l2)
        out[f"{pos} vs {neg}"] = res
    return out


def merge_volumes(meta_rows: list, volume_rows: list, column: str = "volume_ml") -> list:
    """Metadata rows with ``volume_ml`` taken from a volumes CSV (``id``, ``volume_ml``) joined on ``id``."""
    vols = {r["id"]: r[column] for r in volume_rows}
    merged = []
    for r in meta_rows:
        if r["id"] in vols and vols[r["id"]] not in ("", None) and math.isfinite(float(vols[r["id"]])):
            merged.append({**r, "volume_ml": float(vols[r["id"]])})
    return merged


__all__ = ["cross_validate", "diagnose", "logistic_fit", "merge_volumes", "read_csv_rows", "synthetic_metadata"]
_ = Path
