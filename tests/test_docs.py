"""The user documentation (README.md, docs/*.md): every ```python block runs under a test or is marked
``<!-- not-run: reason -->`` right before it; the small blocks run here; relative links resolve; test files named in
the docs and CI exist; no work notes."""

from __future__ import annotations

import ast
import re

import pytest

from tests._docs import ROOT, RUN_BY, all_blocks, blocks, doc_files, section_span

HERE = "tests/test_docs.py::test_small_doc_blocks_run"
SMALL = [key for key, test in RUN_BY.items() if test == HERE]
GENERATED = {"docs/results.md"}  # written by a script from the benchmark outputs


def _rel(path) -> str:
    return path.relative_to(ROOT).as_posix()


@pytest.mark.parametrize("path, heading", SMALL, ids=[f"{p}:{h[3:]}" for p, h in SMALL])
def test_small_doc_blocks_run(path, heading, tmp_path, monkeypatch):
    code = blocks(path, heading)
    assert code, f"{path} {heading!r} has no python block"
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": "__docs__"}
    for block in code:
        exec(compile(block, f"{path}: {heading}", "exec"), ns)


def test_every_python_block_runs_under_a_test_or_is_marked_not_run():
    unrun = []
    for path in doc_files():
        if _rel(path) in GENERATED:
            continue
        text = path.read_text(encoding="utf-8")
        spans = [section_span(text, heading) for (file, heading) in RUN_BY if file == _rel(path)]
        for offset, code, marked in all_blocks(path):
            if not marked and not any(start <= offset < end for start, end in spans):
                line = text.count("\n", 0, offset) + 1
                unrun.append(f"{_rel(path)}:{line}: {code.splitlines()[0] if code else ''}")
    assert not unrun, ("python blocks that no test runs (add the section to tests/_docs.py RUN_BY with a test that "
                       "runs it, or put <!-- not-run: reason --> on the line before the block):\n" + "\n".join(unrun))


@pytest.mark.parametrize("key", list(RUN_BY), ids=[f"{p}:{h[3:]}" for p, h in RUN_BY])
def test_run_by_names_an_existing_test_of_a_section_with_python(key):
    path, heading = key
    assert blocks(path, heading), f"{path} {heading!r}: no python block left there; update tests/_docs.py RUN_BY"
    file, name = RUN_BY[key].split("::")
    tree = ast.parse((ROOT / file).read_text(encoding="utf-8"))
    assert name in {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}, RUN_BY[key]


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    for heading in re.findall(r"^#+ (.+)$", text, flags=re.M):
        out.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return out


def test_relative_links_resolve():
    broken = []
    for path in doc_files():
        text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if _rel(dest) in GENERATED and not dest.exists():
                continue  # generated from the benchmark outputs by its own script
            if not dest.exists():
                broken.append(f"{_rel(path)}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text(encoding="utf-8")):
                broken.append(f"{_rel(path)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_test_files_named_in_docs_and_ci_exist():
    """Every test file that the docs, CONTRIBUTING.md, SECURITY.md, .ci/run or the benchmark notes name
    (``tests/.../test_x.py``) exists: a test moved to another folder takes its mentions with it."""
    upstream = {"tests/test_custom_models.py"}  # PEFT's own suite file, in its sdist (docs/parity.md)
    named = [*doc_files(), *(ROOT / f for f in ("CONTRIBUTING.md", "SECURITY.md", ".ci/run", "benchmarks/README.md",
                                                  "benchmarks/gpu_check.sh"))]
    missing = []
    for path in named:
        for name in sorted(set(re.findall(r"(?<![\w/])tests/[\w/]+\.py", path.read_text(encoding="utf-8")))):
            if name not in upstream and not (ROOT / name).is_file():
                missing.append(f"{_rel(path)}: {name}")
    assert not missing, "\n".join(missing)


def test_user_docs_hold_no_work_notes():
    """Issue numbers, commit hashes and before/after accounts belong in the history, not in user documentation."""
    notes = re.compile(r"\(issue \d+\)|\bissue \d+|`[0-9a-f]{7,12}`|\bcommit `|before and after this|this issue")
    found = []
    for path in doc_files():
        if _rel(path) in GENERATED:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if notes.search(line.lower()):
                found.append(f"{_rel(path)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_readme_stays_short():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 200, "move detail to docs/"
