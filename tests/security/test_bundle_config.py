"""Untrusted MONAI bundle configs and checkpoint files: ``@`` reference and YAML alias bombs fail fast with a typed
error, ``%`` macros stay inside the bundle folder, bad references name themselves and their file, and malformed
checkpoint bytes raise :class:`NetworkLoadError` (never a bare ``EOFError`` / ``IndexError`` / ``RecursionError``)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time

import pytest
import torch

from peft_tensor.networks import NetworkLoadError, load_network
from peft_tensor.networks.load import read_checkpoint
from tests.networks._nets import UNETR, build, same_tensors, unetr_kwargs

SECRET = "s3cr3t-token-do-not-leak"


@pytest.fixture(scope="module")
def src():
    return build(UNETR, unetr_kwargs(), seed=1)


@pytest.fixture(scope="module")
def weights(src, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "model.pt"
    torch.save(src.state_dict(), path)
    return path


def _bundle(folder, weights, config, *, name="inference.json", text: str | None = None):
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    (folder / "models" / "model.pt").write_bytes(weights.read_bytes())
    body = text if text is not None else json.dumps(config)
    (folder / "configs" / name).write_text(body, encoding="utf-8")
    return folder


def _netdef(**changes):
    return {"_target_": UNETR, **unetr_kwargs(), **changes}


@contextlib.contextmanager
def _fails_fast(limit: float = 2.0, guard: float = 20.0):
    """Assert the block took < ``limit`` s; a SIGALRM after ``guard`` s interrupts a runaway (pre-fix) expansion so
    that the test fails instead of hanging the run."""

    class _Runaway(BaseException):
        pass

    def _alarm(signum, frame):
        raise _Runaway(f"still running after {guard} s")

    armed = hasattr(signal, "setitimer")
    if armed:
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, guard)
    start = time.perf_counter()
    try:
        yield
    except _Runaway as exc:
        pytest.fail(f"not bounded: {exc}")
    finally:
        if armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    elapsed = time.perf_counter() - start
    assert elapsed < limit, f"took {elapsed:.1f} s"


# ---------------------------------------------------------------------------------------------- 1. @ references
def test_reference_bomb_fails_fast(tmp_path, weights):
    config = {"a0": [1] * 10, **{f"a{i}": [f"@a{i - 1}"] * 10 for i in range(1, 8)},
              "network_def": _netdef(img_size="@a7")}
    bundle = _bundle(tmp_path / "b", weights, config)
    assert (bundle / "configs" / "inference.json").stat().st_size < 1024
    with _fails_fast(), pytest.raises(NetworkLoadError, match="inference.json.*(too large|expand)"):
        load_network(bundle)


def test_deep_nesting_and_reference_chains_are_typed(tmp_path, weights):
    deep: dict = {"leaf": 1}
    for _ in range(600):
        deep = {"x": deep}
    bundle = _bundle(tmp_path / "nested", weights, {"network_def": _netdef(extra=deep)})
    with _fails_fast(), pytest.raises(NetworkLoadError, match="inference.json.*deep"):
        load_network(bundle)
    chain = {"r0": 2, **{f"r{i}": f"@r{i - 1}" for i in range(1, 600)}, "network_def": _netdef(out_channels="@r599")}
    bundle = _bundle(tmp_path / "chain", weights, chain)
    with _fails_fast(), pytest.raises(NetworkLoadError, match="inference.json.*deep"):
        load_network(bundle)
    with pytest.raises(NetworkLoadError, match="inference.json.*(deep|cannot be read)"):  # json itself gives up
        load_network(_bundle(tmp_path / "raw", weights, None, text='{"network_def": ' + "[" * 100_000))


@pytest.mark.parametrize("ref, config", [
    ("@lst#5", {"lst": [1, 2]}),
    ("@lst::-1", {"lst": [1, 2]}),
    ("@n#x", {"n": 3}),
    ("@n::x::y", {"n": {"x": "a string"}}),
    ("@missing", {}),
    ("@d#nokey", {"d": {"k": 1}}),
])
def test_bad_references_are_typed_and_named(tmp_path, weights, ref, config):
    bundle = _bundle(tmp_path / "b", weights, {**config, "network_def": _netdef(out_channels=ref)})
    with pytest.raises(NetworkLoadError) as err:
        load_network(bundle)
    assert ref in str(err.value) and "inference.json" in str(err.value)


def test_references_resolve_like_monai(tmp_path, weights, src):
    """``@id``, ``@id#key#0``, ``@id::key``, ``$@id``, relative ``@#sibling`` and memoised repeats still load."""
    config = {"spatial": 16, "dims": {"img": ["@spatial", "@spatial", "@spatial"]}, "heads": {"n": [4, 8]},
              "many": ["@dims::img"] * 200,
              "network_def": _netdef(img_size="@dims#img", num_heads="@heads#n#0", out_channels="$@outs::two",
                                     feature_size="@#fs", fs=8, unused="@many"),
              "outs": {"two": 2}}
    bundle = _bundle(tmp_path / "b", weights, config)
    net, report = load_network(bundle)
    assert report.complete and same_tensors(src.state_dict(), net.state_dict())
    assert any("dropped fs=8" in n for n in report.notes) and any("dropped unused" in n for n in report.notes)


def test_circular_reference_and_code_are_refused(tmp_path, weights):
    bundle = _bundle(tmp_path / "c", weights, {"a": "@b", "b": ["@a"], "network_def": _netdef(out_channels="@a")})
    with _fails_fast(), pytest.raises(NetworkLoadError, match="circular reference"):
        load_network(bundle)
    bundle = _bundle(tmp_path / "e", weights, {"network_def": _netdef(out_channels="$__import__('os').getpid()")})
    with pytest.raises(NetworkLoadError, match="Python expression"):
        load_network(bundle)
    nested = {"act": {"_target_": "torch.nn.ReLU"}, "network_def": _netdef(norm_name="@act")}
    with pytest.raises(NetworkLoadError, match="nested component"):
        load_network(_bundle(tmp_path / "n", weights, nested))


# ---------------------------------------------------------------------------------------------- 2. whole config
def test_monai_config_parser_is_not_used(tmp_path, weights, monkeypatch):
    import monai.bundle

    def _refuse(*args, **kwargs):
        raise AssertionError("monai.bundle.ConfigParser parses the whole untrusted config")

    monkeypatch.setattr(monai.bundle, "ConfigParser", _refuse)
    zoo_like = {"imports": ["$import os"], "run": ["$@evaluator.run()"], "big": "%configs/absent.json::x",
                "network_def": _netdef()}
    _, report = load_network(_bundle(tmp_path / "b", weights, zoo_like))
    assert report.complete


def test_yaml_alias_bomb_outside_network_def_is_not_expanded(tmp_path, weights):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 7)]
    lines.append("network_def: " + json.dumps(_netdef()))
    text = "\n".join(lines) + "\n"
    assert len(text.encode()) < 1024
    bundle = _bundle(tmp_path / "b", weights, None, name="inference.yaml", text=text)
    with _fails_fast():
        _, report = load_network(bundle)
    assert report.complete
    referenced = text.replace("network_def: ", "net: ") + "network_def: " + json.dumps(_netdef(extra="@a6")) + "\n"
    bundle = _bundle(tmp_path / "r", weights, None, name="inference.yaml", text=referenced)
    with _fails_fast(), pytest.raises(NetworkLoadError, match="inference.yaml.*(too large|expand)"):
        load_network(bundle)


def test_yaml_with_many_aliases_or_nodes_is_refused(tmp_path, weights):
    lines = ["a0: &a0 [x, x]"] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 12)}]" for i in range(1, 10)]
    text = "\n".join(lines) + "\nnetwork_def: " + json.dumps(_netdef()) + "\n"
    bundle = _bundle(tmp_path / "b", weights, None, name="inference.yaml", text=text)
    with _fails_fast(), pytest.raises(NetworkLoadError, match="inference.yaml.*alias"):
        load_network(bundle)
    wide = "big: [" + ", ".join(["1"] * 300_000) + "]\nnetwork_def: " + json.dumps(_netdef()) + "\n"
    bundle = _bundle(tmp_path / "w", weights, None, name="inference.yaml", text=wide)
    with pytest.raises(NetworkLoadError, match="inference.yaml.*(too large|nodes|bytes)"):
        load_network(bundle)


def _secret(path):
    path.write_text(json.dumps({"token": SECRET, "n": 2}), encoding="utf-8")
    return path


def test_macros_outside_the_bundle_are_refused(tmp_path, weights, monkeypatch):
    outside = _secret(tmp_path / "secret.json")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    _secret(cwd / "cwd_secret.json")
    monkeypatch.chdir(cwd)
    cases = {"abs": f"%{outside}::token", "abs_hash": f"%{outside}#token", "cwd_relative": "%cwd_secret.json::token",
             "parent": "%../secret.json::token", "up": "%configs/../../secret.json::token"}
    for name, macro in cases.items():
        bundle = _bundle(tmp_path / name, weights, {"network_def": _netdef(norm_name=macro)})
        with pytest.raises(NetworkLoadError) as err:
            load_network(bundle)
        assert "inference.json" in str(err.value) and SECRET not in str(err.value), name
    link = _bundle(tmp_path / "link", weights, {"network_def": _netdef(norm_name="%configs/link.json::token")})
    try:
        os.symlink(outside, link / "configs" / "link.json")
    except OSError:
        pytest.skip("no symlinks here")
    with pytest.raises(NetworkLoadError, match="outside the bundle") as err:
        load_network(link)
    assert SECRET not in str(err.value)


def test_macros_inside_the_bundle_still_work(tmp_path, weights, src):
    bundle = _bundle(tmp_path / "b", weights, {"network_def": "%configs/common.json::net", "two": 2})
    common = {"net": _netdef(out_channels="@two"), "other": "%configs/common.json::net::out_channels"}
    (bundle / "configs" / "common.json").write_text(json.dumps(common), encoding="utf-8")
    net, report = load_network(bundle)
    assert report.complete and same_tensors(src.state_dict(), net.state_dict())
    local = _bundle(tmp_path / "l", weights, {"kw": unetr_kwargs(), "network_def": _netdef(img_size="%kw#img_size")})
    assert load_network(local)[1].complete


# ---------------------------------------------------------------------------------------------- 3. checkpoints
@pytest.mark.parametrize("data", [b"", b"hello world this is not", b"\x80\x02e", b"\x80\x02]q\x00.", b"PK\x03\x04zz",
                                  b"\x80\x04\x95"])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_non_checkpoint_bytes_raise_network_load_error(tmp_path, data, suffix):
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(data)
    for allow_pickle in (False, True):
        with pytest.raises(NetworkLoadError, match="bad") as err:
            read_checkpoint(path, allow_pickle=allow_pickle)
        assert err.value.__cause__ is None


def test_pickle_refusal_message_is_kept(tmp_path, src):
    path = tmp_path / "whole.pt"
    torch.save(src, path)
    with pytest.raises(NetworkLoadError, match="allow_pickle=True"):
        read_checkpoint(path)


def test_hub_snapshot_symlinks_into_blobs_are_inside(tmp_path, weights, src):
    """A Hub snapshot's files are symlinks into the repo's ``blobs``: macros between them still resolve."""
    repo = tmp_path / "models--someone--bundle"
    (repo / "blobs").mkdir(parents=True)
    bundle = _bundle(repo / "snapshots" / "abc123", weights, {"network_def": "%configs/common.json#net"})
    blob = repo / "blobs" / "0123abcd"
    blob.write_text(json.dumps({"net": _netdef()}), encoding="utf-8")
    try:
        os.symlink(os.path.relpath(blob, bundle / "configs"), bundle / "configs" / "common.json")
    except OSError:
        pytest.skip("no symlinks here")
    net, report = load_network(bundle)
    assert report.complete and same_tensors(src.state_dict(), net.state_dict())


def test_separator_is_monai_s():
    from monai.bundle.utils import ID_SEP_KEY

    from peft_tensor.networks.bundle_config import ID_SEP

    assert ID_SEP == ID_SEP_KEY
