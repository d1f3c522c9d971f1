"""`import peft_tensor` registers the methods with PEFT: idempotent, reload-safe, clear failure otherwise."""

import importlib

import pytest
from peft import PeftConfig, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import peft_tensor
from peft_tensor import _peft_compat, _registration
from tests._models import TinyMLP


def test_members_and_mappings():
    for name in ("TCURLORA", "LORAPT"):
        member = PeftType(name)
        assert member.name == member.value == name and PeftType[name] is member
        assert PEFT_TYPE_TO_CONFIG_MAPPING[member].__module__.startswith("peft_tensor")
        assert PEFT_TYPE_TO_TUNER_MAPPING[name].__module__.startswith("peft_tensor")  # raw JSON string lookup works
    cfg = PeftConfig.from_peft_type(peft_type="TCURLORA", r=2, target_modules=["lin1"])
    assert type(cfg).__name__ == "TCURLoraConfig"


def test_import_twice_and_reload_are_idempotent():
    import peft_tensor.tuners.lorapt as lorapt_pkg
    import peft_tensor.tuners.tcurlora as tcur_pkg

    n_members = len(PeftType)
    importlib.reload(tcur_pkg)
    importlib.reload(lorapt_pkg)
    importlib.reload(peft_tensor)
    assert len(PeftType) == n_members
    pm = get_peft_model(TinyMLP(), peft_tensor.TCURLoraConfig(r=2, target_modules=["lin1", "lin2"]))
    assert pm.peft_type == "TCURLORA"


def test_peft_loaders_are_wrapped_once_to_enter_the_loading_context(monkeypatch):
    from peft import PeftModel

    from peft_tensor.tuners import _loading_context

    _registration.install_loader_hooks()  # again, after the imports (and the reload above): no second layer
    for fn in (PeftModel.__dict__["from_pretrained"].__func__, PeftModel.__dict__["load_adapter"]):
        assert getattr(fn, "__peft_tensor_loading_adapter__", False)
        assert not getattr(fn.__wrapped__, "__peft_tensor_loading_adapter__", False)
    seen = []

    def probe(self, *args, **kwargs):
        seen.append(_loading_context.is_loading_adapter())

    monkeypatch.setattr(PeftModel, "load_adapter", _registration._within_loading_adapter(probe))
    PeftModel.load_adapter(None, "path", "name")
    assert seen == [True] and not _loading_context.is_loading_adapter()


def test_existing_member_is_tolerated():
    assert _registration.ensure_peft_type("LORA") is PeftType.LORA
    assert _registration.ensure_peft_type("TCURLORA") is PeftType.TCURLORA


def test_unexpected_peft_internals_fail_clearly(monkeypatch):
    class NotAnEnum(str):
        __members__ = {}

    monkeypatch.setattr(_peft_compat, "PeftType", NotAnEnum)  # the enum touchpoint lives in _peft_compat
    with pytest.raises(_registration.PeftTensorRegistrationError, match="installed peft is incompatible"):
        _registration.ensure_peft_type("SOMETHINGNEW")


def test_every_method_is_in_the_registry_and_everything_reads_it():
    from peft_tensor.loading import KNOWN_PROVIDERS
    from peft_tensor.registry import get_method, methods
    from peft_tensor.training.arms import ARMS, PEFT_ARMS, peft_config

    assert list(methods()) == ["tcurlora", "lorapt", "hyps"]
    for name, spec in methods().items():
        assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType(spec.peft_type)] is spec.config_cls
        assert PEFT_TYPE_TO_TUNER_MAPPING[spec.peft_type] is spec.model_cls
        assert KNOWN_PROVIDERS[spec.peft_type] == "peft-tensor"
        assert get_method(spec.peft_type) is spec and name in PEFT_ARMS and name in ARMS
        config = peft_config(name, {"name": name}, {"name": "swinunetr"})
        assert isinstance(config, spec.config_cls)
        if spec.targets:  # the method's own list for this backbone
            assert set(config.target_modules) == set(spec.targets_for("swinunetr"))
        else:  # the tuner takes the network's preset (target_modules=None)
            assert config.target_modules is None
        assert all(getattr(config, k) == v for k, v in spec.arm_defaults.items())
        assert spec.lr is None or spec.lr > 0
    with pytest.raises(KeyError, match="registered: tcurlora, lorapt, hyps"):
        get_method("nosuchmethod")


def test_registry_lr_is_the_arms_method_lr(monkeypatch):
    import dataclasses

    from peft_tensor import registry
    from peft_tensor.training.arms import optimizer_settings

    alone = {"decoder": "head"}  # the registry's rates are the adapter's alone; with the decoder, a tenth
    assert optimizer_settings({"name": "lora", **alone}) == {"method_lr": registry.BASELINE_LR["lora"]}  # swept
    assert optimizer_settings({"name": "full"}) == {}
    spec = registry.get_method("tcurlora")
    monkeypatch.setitem(registry._METHODS, "tcurlora", dataclasses.replace(spec, lr=0.03, weight_decay=None))
    assert optimizer_settings({"name": "tcurlora", **alone}) == {"method_lr": 0.03}
    assert optimizer_settings({"name": "tcurlora"}) == {"method_lr": 0.003}
    assert optimizer_settings({"name": "tcurlora", "method_lr": 1e-3, "lr": 2e-3}) == {"method_lr": 1e-3, "lr": 2e-3}
    monkeypatch.setitem(registry._METHODS, "tcurlora", dataclasses.replace(spec, lr=0.03, weight_decay=0.0))
    assert optimizer_settings({"name": "tcurlora", **alone}) == {"method_lr": 0.03, "method_weight_decay": 0.0}


def test_readme_methods_table_lists_every_registered_method():
    from pathlib import Path

    from peft_tensor.registry import methods

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme[: readme.index("## Install")]
    for spec in methods().values():
        assert f"`{spec.config_cls.__name__}`" in table, f"README.md's methods table lacks {spec.name}"
        assert spec.paper.split(" (")[0] in table, f"README.md's methods table lacks {spec.name}'s paper"
