"""A guard for fuzzing loaders: no write outside an allowed folder, no network connection, bounded memory.

Python's audit hooks (PEP 578) see every ``open`` and ``socket.connect`` of the process, including those made by
libraries. A hook cannot be removed once added, so one hook is installed per process and consults the active guard
(none outside a ``with guard(...)`` block).
"""

from __future__ import annotations

import os
import sys
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

_ACTIVE: list["_Guard"] = []
_INSTALLED = False

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class _Guard:
    def __init__(self, allowed: Path) -> None:
        self.allowed = os.path.realpath(allowed)
        self.violations: list[str] = []


def _writes(mode, flags) -> bool:
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return isinstance(flags, int) and bool(flags & _WRITE_FLAGS)


def _hook(event: str, args) -> None:
    if not _ACTIVE:
        return
    guard = _ACTIVE[-1]
    if event == "open":
        path, mode, flags = (tuple(args) + (None, None, None))[:3]
        if isinstance(path, (str, bytes, os.PathLike)) and _writes(mode, flags):
            real = os.path.realpath(os.fsdecode(path))
            if not (real == guard.allowed or real.startswith(guard.allowed + os.sep)):
                guard.violations.append(f"write to {real}")
    elif event in ("socket.connect", "socket.getaddrinfo", "urllib.Request"):
        guard.violations.append(f"{event} {args!r:.200}")


@contextmanager
def guard(allowed: Path, max_python_bytes: int = 64 << 20):
    """Fail (AssertionError after the block) on a write outside ``allowed``, any network access, or a Python-heap peak
    above ``max_python_bytes`` (the parsers' data structures live on the Python heap)."""
    global _INSTALLED
    if not _INSTALLED:
        sys.addaudithook(_hook)
        _INSTALLED = True
    g = _Guard(allowed)
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    _ACTIVE.append(g)
    try:
        yield g
    finally:
        _ACTIVE.pop()
        _, peak = tracemalloc.get_traced_memory()
        if started:
            tracemalloc.stop()
    assert not g.violations, f"the loader did what it must not: {g.violations[:3]}"
    assert peak <= max_python_bytes, f"Python heap peak {peak / 2**20:.0f} MiB exceeds {max_python_bytes / 2**20:.0f}"
