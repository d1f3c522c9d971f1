"""Atomic file writes: a temporary file in the target folder, flushed to disk, then ``os.replace``.

A crash or an error mid-write leaves the previous file (or no file) under the real name, never a partial one. The
result has the permissions a plain ``open(path, "w")`` would give it: those of the file it replaces, else ``0o666``
less the umask (``mkstemp`` alone would leave every result readable by its owner only).

A symbolic link at the destination is never followed: ``os.replace`` replaces the link itself with the new file (its
target, wherever it points, is left as it was), and the new file gets the default permissions, not the target's.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_json"]


def _current_umask() -> int:
    # os.umask can only be read by setting it; /proc gives it without a (process-wide) change where it exists
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(path: Path) -> int:
    """The permissions ``open(path, "w")`` would leave: the existing file's, else 0o666 less the umask.

    ``lstat``: a symbolic link (dangling, looping or not) is replaced, not followed, so its target's mode is not
    copied (the result would otherwise take e.g. the executable bits of whatever file the link names)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is None or stat.S_ISLNK(st.st_mode):
        return 0o666 & ~_current_umask()
    return stat.S_IMODE(st.st_mode)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then move the result to ``path`` atomically (parent folders are created).

    A symbolic link at ``path`` is replaced by the new file; its target is never written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # keep the suffixes: writers such as nibabel choose the format from the file name
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + "".join(path.suffixes), dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _mode_for(path))  # after write(): a writer may replace the temporary file with a new one
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    atomic_write(path, write)


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
