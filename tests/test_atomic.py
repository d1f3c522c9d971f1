"""Atomic writes (peft_tensor._atomic) leave files with the permissions a plain ``open()`` would give them."""

from __future__ import annotations

import os
import stat

import pytest

from peft_tensor._atomic import atomic_write, atomic_write_json, atomic_write_text


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
@pytest.mark.parametrize("writer", ["text", "json", "callback"])
def test_atomic_write_honours_the_umask(tmp_path, umask, mask, expected, writer):
    umask(mask)
    plain, atomic = tmp_path / "plain.txt", tmp_path / "atomic.txt"
    plain.write_text("x")
    if writer == "text":
        atomic_write_text(atomic, "x")
    elif writer == "json":
        atomic_write_json(atomic, {"x": 1})
    else:
        atomic_write(atomic, lambda tmp: open(tmp, "wb").close())
    assert _mode(plain) == expected
    assert _mode(atomic) == expected


def test_atomic_overwrite_keeps_the_mode_of_the_existing_file(tmp_path, umask):
    """As ``open(path, "w")`` on an existing file does: its permissions are kept, whatever the umask."""
    umask(0o022)
    path = tmp_path / "f.txt"
    path.write_text("old")
    os.chmod(path, 0o640)
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and _mode(path) == 0o640
