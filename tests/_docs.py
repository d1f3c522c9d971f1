"""Code blocks of the user documentation (README.md and docs/*.md), found by file and section heading.

Every ```python block there either runs under a test or is marked as not runnable by an HTML comment on the line
right before it, ``<!-- not-run: reason -->``; ``tests/test_docs.py`` checks that, using :data:`RUN_BY` below.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOT_RUN = re.compile(r"<!--\s*not-run:\s*\S.*?-->\s*$")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", flags=re.S | re.M)

# The sections whose ```python blocks a test runs as written: (file, heading) -> the test that runs them.
RUN_BY = {
    ("README.md", "## Usage"): "tests/test_readme.py::test_readme_usage_example_runs",
    ("README.md", "## Start from your pretrained network"):
        "tests/networks/test_bundle.py::test_readme_block_bundle_round_trip_in_a_fresh_process",
    ("docs/recipes.md", "## From your pretrained network to a shared adapter"):
        "tests/test_readme.py::test_start_from_your_pretrained_network_runs",
    ("docs/methods.md", "## HyPS"): "tests/test_docs.py::test_small_doc_blocks_run",
    ("docs/methods.md", "## Per-layer ranks: `rank_pattern` and `rank_cap`"):
        "tests/test_docs.py::test_small_doc_blocks_run",
    ("docs/convolutions.md", "## tCURLoRA and LoRA-PT: kernel layouts"):
        "tests/test_docs.py::test_small_doc_blocks_run",
}


def doc_files() -> list[Path]:
    """README.md and every docs/*.md."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def section_span(text: str, heading: str) -> tuple[int, int]:
    """Start and end offsets of the section under ``heading`` (a whole line such as ``## Usage``): up to the next
    heading of the same or a higher level."""
    fences = [m.span() for m in FENCE.finditer(text)]  # a "# comment" line in a code block is no heading

    def headings(pattern: str):
        return [m for m in re.finditer(pattern, text, flags=re.M) if not any(a <= m.start() < b for a, b in fences)]

    found = headings(rf"^{re.escape(heading)}\n")
    if len(found) != 1:
        raise AssertionError(f"{len(found)} headings {heading!r}, expected one")
    level = len(heading) - len(heading.lstrip("#"))
    later = [m.start() for m in headings(rf"^#{{1,{level}}} ") if m.start() > found[0].start()]
    return found[0].start(), later[0] if later else len(text)


def section(path: str, heading: str) -> str:
    """The text of the section under ``heading`` in ``path`` (relative to the repository root)."""
    text = (ROOT / path).read_text(encoding="utf-8")
    start, end = section_span(text, heading)
    return text[start:end]


def blocks(path: str, heading: str, lang: str = "python") -> list[str]:
    """The ```lang code blocks of one section, in order."""
    return [m.group(2) for m in FENCE.finditer(section(path, heading)) if m.group(1) == lang]


def all_blocks(path: Path, lang: str = "python") -> list[tuple[int, str, bool]]:
    """(offset, code, marked not-run) of every ```lang block of a file."""
    text = path.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        if m.group(1) == lang:
            before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
            out.append((m.start(), m.group(2), bool(NOT_RUN.search(before))))
    return out
