"""A user's own dataset loader, named by dotted path in the tests (``data.kind=tests.data.user_loader.<function>``)."""

from __future__ import annotations

import csv
from pathlib import Path


def from_csv(root: str, table: str = "cases.csv") -> dict:
    """``root/table`` has columns image, label, split: the mapping form a loader may return."""
    root = Path(root)
    splits: dict = {}
    with open(root / table, newline="") as f:
        for row in csv.DictReader(f):
            splits.setdefault(row["split"], []).append({"image": str(root / row["image"]),
                                                        "label": str(root / row["label"])})
    return splits


def not_a_mapping(root: str) -> list:
    return [root]
