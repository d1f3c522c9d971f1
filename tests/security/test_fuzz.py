"""Fuzzing the loaders with hypothesis: whatever bytes or values a file or repo holds, each reader either succeeds or
raises one of the package's typed errors (a ``PeftTensorError``), writes nothing outside a temporary folder, opens no
network connection and keeps its memory bounded (``tests/security/_guard.py``). Bounded to well under a minute."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from peft_tensor.errors import PeftTensorError
from tests.security._guard import guard

FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

json_scalars = (st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
                | st.text(max_size=12))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["_target_", "__torch_dtype__", "act", "in_channels", "img_size", "pretrained_url", "@x", "$x",
                         "%x", "peft_type", "r", "kwargs", "class", "weights", "path"]) | st.text(max_size=6),
        inner, max_size=4),
    max_leaves=20)


def _typed_or_ok(call) -> object:
    try:
        return call()
    except PeftTensorError:
        return None


def _in_tmp(write):
    """Run ``write(folder)`` then yield the folder: a fresh temporary folder that is the only writable place."""
    tmp = tempfile.TemporaryDirectory()
    folder = Path(tmp.name)
    write(folder)
    return tmp, folder


# -------------------------------------------------------------------------------------------------- byte-level
def _valid_safetensors() -> bytes:
    return st_save({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "i": torch.tensor([1, 2])})


def _mutations(seed_bytes: bytes):
    n = len(seed_bytes)
    return st.one_of(
        st.binary(max_size=256),
        st.tuples(st.integers(0, n - 1), st.integers(0, 255)).map(
            lambda t: seed_bytes[:t[0]] + bytes([t[1]]) + seed_bytes[t[0] + 1:]),
        st.integers(0, n).map(lambda k: seed_bytes[:k]),
        st.tuples(st.integers(0, 2**63), st.binary(max_size=64)).map(lambda t: struct.pack("<Q", t[0]) + t[1]),
        json_values.map(lambda v: (lambda h: struct.pack("<Q", len(h)) + h)(json.dumps({"w": v}).encode())),
    )


@FUZZ
@given(data=_mutations(_valid_safetensors()))
def test_safetensors_header_reader(data):
    from peft_tensor.loading import read_safetensors_header

    tmp, folder = _in_tmp(lambda f: (f / "adapter_model.safetensors").write_bytes(data))
    with tmp, guard(folder):
        _typed_or_ok(lambda: read_safetensors_header(folder / "adapter_model.safetensors"))


@FUZZ
@given(data=_mutations(_valid_safetensors()), suffix=st.sampled_from([".safetensors", ".pt", ".pth", ".ckpt"]))
def test_read_checkpoint(data, suffix):
    from peft_tensor.networks.load import read_checkpoint

    tmp, folder = _in_tmp(lambda f: (f / f"model{suffix}").write_bytes(data))
    with tmp, guard(folder):
        _typed_or_ok(lambda: read_checkpoint(folder / f"model{suffix}"))


@pytest.fixture(scope="module")
def torch_checkpoint() -> bytes:
    import io

    buf = io.BytesIO()
    torch.save({"state_dict": {"w": torch.ones(2, 2)}}, buf)
    return buf.getvalue()


@FUZZ
@given(data=st.data())
def test_read_checkpoint_mutated_torch_zip(torch_checkpoint, data):
    from peft_tensor.networks.load import read_checkpoint

    blob = data.draw(_mutations(torch_checkpoint))
    tmp, folder = _in_tmp(lambda f: (f / "model.pt").write_bytes(blob))
    with tmp, guard(folder):
        _typed_or_ok(lambda: read_checkpoint(folder / "model.pt"))


# -------------------------------------------------------------------------------------------------- cards
card_front = st.one_of(
    st.text(max_size=200),
    st.sampled_from(["!!python/object/apply:os.system ['true']", "a: &a [1, 2]\nb: [*a, *a, *a]", "- [", "{",
                     "library_name: !!binary aGk=", "tags: 2024-01-01", "base_model: [1, {x: 2}]"]),
    json_values.map(json.dumps),
)


@FUZZ
@given(front=card_front, body=st.binary(max_size=64), as_text=st.booleans())
def test_model_card_reader(front, body, as_text):
    from peft_tensor.hub.cards import read_card

    raw = b"---\n" + front.encode("utf-8", "surrogatepass") + b"\n---\n" + body if as_text else body
    tmp, folder = _in_tmp(lambda f: (f / "README.md").write_bytes(raw))
    with tmp, guard(folder):
        _typed_or_ok(lambda: read_card(folder / "README.md"))


# -------------------------------------------------------------------------------------------------- JSON records
@FUZZ
@given(cfg=json_values, peft_type=st.sampled_from(["TCURLORA", "LORAPT", "HYPS", "LORA", "PROMPT_TUNING", "SHADOW",
                                                   "X", None]))
def test_adapter_config_reader(cfg, peft_type):
    from peft_tensor.loading import read_adapter_config

    record = dict(cfg) if isinstance(cfg, dict) else {"value": cfg}
    if peft_type is not None:
        record.setdefault("peft_type", peft_type)
    tmp, folder = _in_tmp(lambda f: (f / "adapter_config.json").write_text(json.dumps(record)))
    with tmp, guard(folder):
        _typed_or_ok(lambda: read_adapter_config(folder))


@FUZZ
@given(record=json_values, base=json_values)
def test_provenance_record_reader(record, base):
    from peft_tensor.hub.provenance import BaseNetwork, read_provenance

    data = dict(record) if isinstance(record, dict) else {"x": record}
    data["base_network"] = base
    tmp, folder = _in_tmp(lambda f: (f / "peft_tensor.json").write_text(json.dumps(data)))
    with tmp, guard(folder):
        got = _typed_or_ok(lambda: read_provenance(folder))
        if isinstance(got, dict):
            _typed_or_ok(lambda: BaseNetwork.from_dict(got.get("base_network")))


# -------------------------------------------------------------------------------------------------- the guard itself
def test_the_guard_sees_writes_outside_network_access_and_memory(tmp_path):
    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir()
    with guard(inside):
        (inside / "ok.txt").write_text("fine")
    with pytest.raises(AssertionError, match="write to"):
        with guard(inside):
            (outside).write_text("not fine")
    with pytest.raises(AssertionError, match="socket"):
        with guard(inside):
            import socket

            try:
                socket.getaddrinfo("localhost", 80)
            except OSError:
                pass
    with pytest.raises(AssertionError, match="heap peak"):
        with guard(inside, max_python_bytes=1 << 20):
            _ = [bytes(1 << 10) for _ in range(4096)]


def test_a_card_made_of_aliases_is_refused_fast(tmp_path):
    import time

    from peft_tensor.hub.cards import CardError, read_card

    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 12)]
    (tmp_path / "README.md").write_text("---\n" + "\n".join(lines) + "\n---\n# card\n")
    start = time.perf_counter()
    with pytest.raises(CardError, match="aliases"):
        read_card(tmp_path / "README.md")
    assert time.perf_counter() - start < 2


# -------------------------------------------------------------------------------------------------- decoder, bundles
@FUZZ
@given(value=json_values)
def test_the_one_decoder_gives_data_or_a_typed_error(value, tmp_path):
    from peft_tensor.hub.provenance import decode_value

    with guard(tmp_path):
        got = _typed_or_ok(lambda: decode_value(value))

    def callables(v):
        if isinstance(v, dict):
            return any(callables(x) for x in v.values())
        if isinstance(v, list):
            return any(callables(x) for x in v)
        return callable(v)

    assert not callables(got), f"the decoder produced something callable from {value!r}"


ref_values = st.recursive(
    json_scalars | st.sampled_from(["@a", "@b", "@a#0", "@a::k", "@missing", "@::k", "$@a", "$print(1)",
                                    "%configs/other.json::a", "%/etc/hostname", "%../x.json::a", "@a#99", "@n#x"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["a", "b", "k", "n", "_target_"]),
                                                                inner, max_size=4),
    max_leaves=16)


@FUZZ
@given(a=ref_values, b=ref_values, netdef=ref_values, as_yaml=st.booleans())
def test_bundle_config_reader(a, b, netdef, as_yaml):
    from peft_tensor.networks.bundle_config import read_network_def

    doc = {"a": a, "b": b, "n": 1, "network_def": netdef}

    def write(folder: Path):
        (folder / "configs").mkdir()
        (folder / "configs" / "other.json").write_text(json.dumps({"a": [1, 2]}))
        if as_yaml:
            import yaml

            (folder / "configs" / "inference.yaml").write_text(yaml.safe_dump(doc))
        else:
            (folder / "configs" / "inference.json").write_text(json.dumps(doc))

    tmp, folder = _in_tmp(write)
    name = "inference.yaml" if as_yaml else "inference.json"
    with tmp, guard(folder):
        _typed_or_ok(lambda: read_network_def(folder / "configs" / name, folder))
