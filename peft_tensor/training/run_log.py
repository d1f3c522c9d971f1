"""Run logs: every logged row goes to ``metrics.jsonl`` and ``metrics.csv`` (rewritten atomically, so a resumed
run first drops the rows of steps it will redo)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

from ..data.io import atomic_write_text


class RunLogger:
    def __init__(self, folder: str | os.PathLike, enabled: bool = True, name: str = "metrics"):
        self.folder = Path(folder)
        self.enabled = enabled
        self.jsonl = self.folder / f"{name}.jsonl"
        self.csv = self.folder / f"{name}.csv"
        self.rows: list = []
        if enabled and self.jsonl.is_file():
            self.rows = [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]

    def truncate(self, step: int) -> None:
        """Forget rows of steps >= ``step`` (called on resume)."""
        self.rows = [r for r in self.rows if r.get("step", -1) < step]
        self._write()

    def log(self, **values) -> None:
        self.rows.append({k: _clean(v) for k, v in values.items()})
        self._write()

    def _write(self) -> None:
        if not self.enabled:
            return
        atomic_write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.rows))
        keys = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(self.rows)
        atomic_write_text(self.csv, buf.getvalue())


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, default=_default))


def write_rows_csv(path, rows: list) -> None:
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _default(o):
    try:
        return float(o)
    except Exception:
        return str(o)
