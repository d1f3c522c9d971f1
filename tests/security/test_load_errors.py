"""Untyped errors and failed loads: a crafted model card or adapter config gets a typed one-line error, and a load
that fails for any reason leaves the user's model exactly as it was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import peft_tensor
from peft_tensor import TCURLoraConfig
from peft_tensor.errors import AdapterLoadError, PeftTensorError
from peft_tensor.hub import adapter_info, load_pretrained
from tests._models import TinyMLP

CARD = "---\nlibrary_name: peft-tensor\ntags:\n- peft-tensor\n---\n\n# tiny adapter\n"


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tcur_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tcur")
    pm = get_peft_model(TinyMLP(), TCURLoraConfig(r=2, target_modules=["lin1", "lin2", "lin3"], init_weights=False))
    pm.save_pretrained(path)
    (path / "README.md").write_text(CARD, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("lora")
    pm = get_peft_model(TinyMLP(), LoraConfig(r=2, target_modules=["lin1", "lin2", "lin3"], init_lora_weights=False))
    pm.save_pretrained(path)
    return path


def _copy(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    if config_changes:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        cfg.update(config_changes)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


class Snapshot:
    """Everything about a model that a failed load must leave as it was."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.modules = list(model.named_modules(remove_duplicate=False))
        self.children = {name: dict(m._modules) for name, m in self.modules}
        self.params = list(model.named_parameters())
        self.grad = {n: p.requires_grad for n, p in self.params}
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.training = {name: m.training for name, m in self.modules}
        self.hooks = (dict(model._forward_pre_hooks), dict(model._forward_hooks))
        self.attrs = set(vars(model))
        self.had_peft_config = hasattr(model, "peft_config")

    def assert_unchanged(self):
        model = self.model
        now = list(model.named_modules(remove_duplicate=False))
        assert [n for n, _ in now] == [n for n, _ in self.modules]
        assert all(a is b for (_, a), (_, b) in zip(now, self.modules)), "a submodule was replaced"
        assert {name: dict(m._modules) for name, m in now} == self.children
        assert all(a is b for (_, a), (_, b) in zip(model.named_parameters(), self.params))
        assert {n: p.requires_grad for n, p in model.named_parameters()} == self.grad
        state = model.state_dict()
        assert list(state) == list(self.state)
        assert all(torch.equal(state[k], v) for k, v in self.state.items())
        assert {name: m.training for name, m in now} == self.training
        assert (dict(model._forward_pre_hooks), dict(model._forward_hooks)) == self.hooks
        assert set(vars(model)) == self.attrs and hasattr(model, "peft_config") == self.had_peft_config


def _base() -> TinyMLP:
    model = TinyMLP()
    model.lin0.weight.requires_grad_(False)  # flags of the user's own choosing must survive too
    return model.train()


# ------------------------------------------------------------------------------------------------------ finding 1
BAD_CARDS = {
    "not utf-8": b"---\nlibrary_name: peft-tensor\n---\n\n# caf\xe9 \xff\xfe\n",
    "python object tag": b"---\nlibrary_name: !!python/object/apply:os.system ['touch PWNED']\n---\n\n# x\n",
    "python name tag": b"---\ntags: !!python/name:os.system\n---\n\n# x\n",
    "broken yaml": b"---\ntags: [unclosed\n---\n\n# x\n",
    "not a mapping": b"---\n- a\n- b\n---\n\n# x\n",
}


@pytest.mark.parametrize("kind", list(BAD_CARDS))
def test_crafted_model_card_is_a_typed_one_line_error(tcur_dir, tmp_path, kind, capsys, monkeypatch):
    from peft_tensor.cli import main
    from peft_tensor.hub.cards import CardError

    monkeypatch.chdir(tmp_path)
    path = _copy(tcur_dir, tmp_path / "a")
    (path / "README.md").write_bytes(BAD_CARDS[kind])
    with pytest.raises(CardError, match="README.md is not a valid model card"):
        adapter_info(path)
    assert main(["info", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("peft-tensor info: error:") and "not a valid model card" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "PWNED").exists()


def test_odd_card_metadata_still_describes_the_adapter(tcur_dir, tmp_path, capsys):
    """Valid YAML of unexpected types (a date, numbers and lists among the tags): info still works, also as JSON;
    metadata huggingface_hub cannot take (tags: 5) is a typed CardError."""
    from peft_tensor.cli import main
    from peft_tensor.hub.cards import CardError

    path = _copy(tcur_dir, tmp_path / "a")
    (path / "README.md").write_text("---\nlibrary_name: 2024-01-01\ntags: [5, x, [y]]\n---\n\n# odd\n",
                                    encoding="utf-8")
    assert main(["info", str(path), "--json"]) == 0
    card = json.loads(capsys.readouterr().out)["card"]
    assert card["title"] == "odd" and card["library_name"] == "2024-01-01" and card["tags"] == ["5", "x"]
    (path / "README.md").write_text("---\ntags: 5\n---\n\n# odd\n", encoding="utf-8")
    with pytest.raises(CardError, match="not a valid model card"):
        adapter_info(path)
    assert main(["info", str(path)]) == 1 and "not a valid model card" in capsys.readouterr().err


def test_valid_model_card_is_read(tcur_dir):
    card = adapter_info(tcur_dir)["card"]
    assert card["title"] == "tiny adapter" and card["tags"] == ["peft-tensor"]
    assert card["library_name"] == "peft-tensor"


# ------------------------------------------------------------------------------------------------------ finding 2
FOREIGN_TYPES = ["PROMPT_TUNING", "SHADOW", "LOHA", "FANCYLORA", 5, None, ["TCURLORA"], {"TCURLORA": 1}, True]


@pytest.mark.parametrize("peft_type", FOREIGN_TYPES, ids=str)
def test_foreign_peft_type_is_a_typed_error(tcur_dir, tmp_path, peft_type, capsys):
    from peft_tensor.cli import main
    from peft_tensor.loading import read_adapter_config

    path = _copy(tcur_dir, tmp_path / "a", peft_type=peft_type)
    found = "no 'peft_type'" if peft_type is None else repr(peft_type)
    loaders = [lambda: peft_tensor.from_pretrained(model, str(path)),
               lambda: load_pretrained(path, base_model=model),
               lambda: read_adapter_config(path)]
    for load in loaders:
        model = _base()
        snap = Snapshot(model)
        with pytest.raises(AdapterLoadError) as err:
            load()
        message = str(err.value)
        assert found in message or (peft_type is None and "peft_type" in message), message
        assert "TCURLORA, LORAPT, HYPS" in message, message
        if peft_type is not None:
            assert "plain PEFT" in message, message
        snap.assert_unchanged()
    assert main(["load", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("peft-tensor load: error:") and "TCURLORA, LORAPT, HYPS" in err


def test_supported_types_name_lora_too(tcur_dir, tmp_path):
    path = _copy(tcur_dir, tmp_path / "a", peft_type="PROMPT_TUNING")
    with pytest.raises(AdapterLoadError, match=r"'PROMPT_TUNING'.*TCURLORA, LORAPT, HYPS and LORA.*PeftModel"):
        peft_tensor.from_pretrained(TinyMLP(), str(path))


@pytest.mark.parametrize("peft_type", [5, ["TCURLORA"], True], ids=str)
def test_info_on_non_string_peft_type(tcur_dir, tmp_path, peft_type, capsys):
    from peft_tensor.cli import main

    path = _copy(tcur_dir, tmp_path / "a", peft_type=peft_type)
    with pytest.raises(AdapterLoadError, match="peft_type must be"):
        adapter_info(path)
    assert main(["info", str(path)]) == 1
    assert "peft_type must be" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------ finding 3
BAD_PATTERNS = [
    ("rank_pattern", {"lin2": "x"}), ("rank_pattern", {"lin2": 1.5}), ("rank_pattern", {"lin2": None}),
    ("rank_pattern", {"lin2": True}), ("rank_pattern", {"lin2": 0}), ("rank_pattern", "abc"), ("rank_pattern", ["a"]),
    ("alpha_pattern", {"lin2": "x"}), ("alpha_pattern", {"lin2": [1]}), ("alpha_pattern", 3),
    ("alpha_pattern", {"lin2": float("nan")}),
]


@pytest.mark.parametrize("key, value", BAD_PATTERNS, ids=lambda v: repr(v))
def test_bad_rank_or_alpha_pattern_is_refused_up_front(lora_dir, tmp_path, key, value):
    path = _copy(lora_dir, tmp_path / "a")
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg[key] = value
    (path / "adapter_config.json").write_text(json.dumps(cfg))  # NaN is written as the JSON extension NaN
    for load in (lambda m: peft_tensor.from_pretrained(m, str(path)), lambda m: load_pretrained(path, base_model=m)):
        model = _base()
        snap = Snapshot(model)
        with pytest.raises(AdapterLoadError, match=key):
            load(model)
        snap.assert_unchanged()


def test_good_patterns_still_load(lora_dir, tmp_path):
    path = _copy(lora_dir, tmp_path / "a", rank_pattern={"lin2": 2}, alpha_pattern={"lin2": 3, "lin3": 0.5})
    model = peft_tensor.from_pretrained(TinyMLP(), str(path))
    assert model.base_model.model.lin2.scaling["default"] == 1.5
    assert model.base_model.model.lin3.scaling["default"] == 0.25


def _failing(monkeypatch, exc: BaseException, after_calls: int = 0):
    """Make PeftModel.load_adapter scribble on the base model (values, flags, a new attribute) and raise ``exc``."""
    original = PeftModel.load_adapter
    calls = []

    def load_adapter(self, *args, **kwargs):
        calls.append(1)
        if len(calls) <= after_calls:
            return original(self, *args, **kwargs)
        base = self.get_base_model()
        with torch.no_grad():
            base.lin0.weight.add_(1.0)
            base.head.bias.data = torch.zeros(3)
        base.head.weight.requires_grad_(False)
        base.lin0.weight.requires_grad_(True)
        base.scribbled = True
        raise exc

    monkeypatch.setattr(PeftModel, "load_adapter", load_adapter)


@pytest.mark.parametrize("adapter", ["tcur", "lora"])
@pytest.mark.parametrize("exc", [TypeError("bad type"), AttributeError("no attr"), KeyError("k"),
                                 OSError("disk"), RuntimeError("boom")], ids=lambda e: type(e).__name__)
def test_any_failure_restores_the_model_and_is_typed(tcur_dir, lora_dir, monkeypatch, adapter, exc):
    _failing(monkeypatch, exc)
    model = _base()
    snap = Snapshot(model)
    with pytest.raises(AdapterLoadError, match="Loading the adapter from .* failed") as err:
        peft_tensor.from_pretrained(model, str(tcur_dir if adapter == "tcur" else lora_dir))
    assert err.value.__cause__ is exc
    snap.assert_unchanged()
    with torch.no_grad():
        assert model(torch.ones(2, 10)).shape == (2, 2)


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), SystemExit(3)], ids=lambda e: type(e).__name__)
def test_interrupt_restores_the_model_and_is_reraised_unchanged(tcur_dir, monkeypatch, exc):
    _failing(monkeypatch, exc)
    model = _base()
    snap = Snapshot(model)
    with pytest.raises(type(exc)) as err:
        peft_tensor.from_pretrained(model, str(tcur_dir))
    assert err.value is exc
    snap.assert_unchanged()


def test_failed_second_adapter_restores_the_peft_model(tcur_dir, lora_dir, monkeypatch):
    pm = peft_tensor.from_pretrained(_base(), str(tcur_dir))
    snap = Snapshot(pm)
    configs = dict(pm.peft_config)
    _failing(monkeypatch, TypeError("second"))
    with pytest.raises(AdapterLoadError, match="second"):
        peft_tensor.load_adapter_checked(pm, str(lora_dir), adapter_name="other")
    assert pm.peft_config == configs and pm.active_adapter == "default"
    snap.assert_unchanged()
    assert not any(n.split(".")[-1] == "other" for n, _ in pm.named_modules())


def test_hub_load_with_several_adapters_restores_the_user_model(tcur_dir, lora_dir, tmp_path, monkeypatch):
    root = _copy(lora_dir, tmp_path / "repo")
    _copy(lora_dir, root / "second", lora_alpha=3)
    _failing(monkeypatch, TypeError("second adapter"), after_calls=1)
    model = _base()
    snap = Snapshot(model)
    with pytest.raises(AdapterLoadError, match="second adapter"):
        load_pretrained(root, adapters={"first": None, "second": "second"}, base_model=model)
    snap.assert_unchanged()
    monkeypatch.undo()
    loaded = load_pretrained(root, adapters={"first": None, "second": "second"}, base_model=TinyMLP())
    assert set(loaded.peft_config) == {"first", "second"}


def test_errors_are_peft_tensor_errors(tcur_dir, tmp_path):
    path = _copy(tcur_dir, tmp_path / "a", peft_type="SHADOW")
    with pytest.raises(PeftTensorError):
        peft_tensor.from_pretrained(TinyMLP(), str(path))


def test_downloaded_record_naming_a_local_file_without_hash_is_not_read(tmp_path, monkeypatch):
    """A record that came from the Hub may name a local file of the publisher's machine; without a recorded sha256
    (or not as safetensors) it is refused before any file it names is opened."""
    import builtins

    from peft_tensor.hub import load as hub_load
    from peft_tensor.hub.provenance import WeightsRef

    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"not for you")
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: (opened.append(str(f)), real_open(f, *a, **k))[1])

    class Spec:
        weights = WeightsRef(path=str(secret), sha256=None)

    resolved = hub_load.ResolvedAdapter(tmp_path, {}, repo_id="someone/adapter")
    for ref in (WeightsRef(path=str(secret), sha256=None), WeightsRef(path="/etc/passwd", sha256="0" * 64)):
        Spec.weights = ref
        with pytest.raises(AdapterLoadError, match="not read"):
            hub_load._load_base_weights(None, Spec, resolved, True, None, None, True, None)
    assert str(secret) not in opened and "/etc/passwd" not in opened
