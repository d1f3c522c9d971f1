"""The PEFT internals peft_tensor relies on (``peft_tensor/_peft_compat.py``): one test per touchpoint, so that a PEFT
upgrade fails here first, naming the touchpoint and what changed, instead of somewhere deep in a tuner."""

from __future__ import annotations

import enum
import inspect
import re
from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
from peft import PeftConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from torch import nn

from peft_tensor import HyPSModel, LoraPTModel, TCURLoraConfig, TCURLoraModel
from peft_tensor import _peft_compat as compat
from tests._models import TinyMLP

REPO = Path(__file__).resolve().parent.parent


def _params(fn) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p not in ("self", "cls")]


def _tiny(**kwargs):
    return get_peft_model(TinyMLP(), TCURLoraConfig(r=2, target_modules=["lin1", "lin2"], **kwargs))


def _touchpoint(n: int, what: str) -> str:
    return (f"PEFT touchpoint {n} ({what}) changed in the installed peft {peft.__version__}; peft_tensor supports "
            f"{compat.PEFT_RANGE}. Adapt peft_tensor/_peft_compat.py.")


def test_supported_range_is_the_pinned_one_and_installed():
    assert f'"{compat.PEFT_RANGE}"' in (REPO / "pyproject.toml").read_text(), "pyproject's peft pin != PEFT_RANGE"
    assert compat.PEFT_RANGE in compat.__doc__
    installed = tuple(int(p) for p in re.findall(r"\d+", peft.__version__)[:3])
    assert (0, 21, 2) <= installed < (0, 22, 0), _touchpoint(0, "the installed release")


def test_1_peft_type_is_an_extensible_str_enum():
    pt = compat.PeftType
    assert issubclass(pt, str) and isinstance(pt, enum.EnumMeta), _touchpoint(1, "PeftType is a str-Enum")
    for attr in ("_member_map_", "_value2member_map_", "_member_names_"):
        assert hasattr(pt, attr), _touchpoint(1, f"PeftType.{attr}")
    for name in ("TCURLORA", "LORAPT", "HYPS"):  # added by ensure_peft_type at import
        member = pt(name)
        assert member is pt[name] is getattr(pt, name) and member.value == name and name in pt._member_names_
        assert compat.ensure_peft_type(name) is member  # idempotent
    assert compat.ensure_peft_type("LORA") is pt.LORA  # a PEFT member is returned as is


def test_2_method_registry():
    assert {"name", "config_cls", "model_cls", "prefix"} <= set(_params(compat.register_peft_method)), \
        _touchpoint(2, "register_peft_method's keywords")
    for mapping in (compat.PEFT_TYPE_TO_CONFIG_MAPPING, compat.PEFT_TYPE_TO_TUNER_MAPPING,
                    compat.PEFT_TYPE_TO_PREFIX_MAPPING):
        assert isinstance(mapping, dict), _touchpoint(2, "peft.mapping's PEFT_TYPE_TO_*_MAPPING dicts")
    # looked up with the raw JSON string, as PEFT's own loaders do
    assert compat.PEFT_TYPE_TO_CONFIG_MAPPING["TCURLORA"] is TCURLoraConfig
    assert compat.PEFT_TYPE_TO_TUNER_MAPPING["TCURLORA"] is TCURLoraModel
    assert compat.PEFT_TYPE_TO_PREFIX_MAPPING["TCURLORA"] == "tcurlora_"
    assert type(PeftConfig.from_peft_type(peft_type="TCURLORA", r=2, target_modules=["lin1"])) is TCURLoraConfig


def test_3_peft_model_loaders_are_wrapped():
    from_pretrained, load_adapter = PeftModel.__dict__.get("from_pretrained"), PeftModel.__dict__.get("load_adapter")
    assert isinstance(from_pretrained, classmethod), _touchpoint(3, "PeftModel.from_pretrained is a classmethod")
    assert inspect.isfunction(load_adapter), _touchpoint(3, "PeftModel.load_adapter is a plain method")
    assert getattr(from_pretrained.__func__, compat._HOOK_MARK) and getattr(load_adapter, compat._HOOK_MARK)
    assert _params(from_pretrained.__func__.__wrapped__)[:3] == ["model", "model_id", "adapter_name"], \
        _touchpoint(3, "PeftModel.from_pretrained's signature")
    assert _params(load_adapter.__wrapped__)[:2] == ["model_id", "adapter_name"], \
        _touchpoint(3, "PeftModel.load_adapter's signature")


def test_4_tuner_base_classes_and_helpers():
    assert issubclass(compat.BaseTuner, nn.Module) and inspect.isabstract(compat.BaseTuner)
    assert _params(compat.BaseTuner.inject_adapter)[:5] == [
        "model", "adapter_name", "autocast_adapter_dtype", "low_cpu_mem_usage", "state_dict"], \
        _touchpoint(4, "BaseTuner.inject_adapter")
    assert _params(compat.BaseTuner.set_adapter) == ["adapter_name", "inference_mode"]
    assert _params(compat.BaseTuner.set_requires_grad) == ["adapter_names", "requires_grad"]
    assert _params(compat.check_adapters_to_merge)[:2] == ["module", "adapter_names"], \
        _touchpoint(4, "check_adapters_to_merge")
    assert _params(compat.check_target_module_exists)[:2] == ["config", "key"], \
        _touchpoint(4, "check_target_module_exists")
    model = _tiny()
    layer = model.base_model.model.lin1
    assert isinstance(layer, compat.BaseTunerLayer) and compat.check_adapters_to_merge(layer, None) == ["default"]
    assert compat.check_target_module_exists(model.peft_config["default"], "lin1")
    assert not compat.check_target_module_exists(model.peft_config["default"], "head")


@pytest.mark.parametrize("hook", sorted(compat.TUNER_HOOKS))
def test_5_base_tuner_hooks_exist_with_their_signature(hook):
    fn = getattr(compat.BaseTuner, hook, None)
    assert fn is not None, _touchpoint(5, f"BaseTuner.{hook} is gone")
    expected = compat.TUNER_HOOKS[hook]
    assert tuple(_params(fn)[: len(expected)]) == expected, _touchpoint(5, f"BaseTuner.{hook}{expected}")


def test_5_every_overridden_private_hook_is_named():
    for cls in (TCURLoraModel, LoraPTModel, HyPSModel, compat.MonaiFriendlyTunerMixin):
        for klass in cls.__mro__:
            if klass.__module__.startswith("peft_tensor"):
                private = {n for n, v in vars(klass).items() if n.startswith("_") and not n.startswith("__")
                           and (callable(v) or isinstance(v, (classmethod, staticmethod)))}
                overridden = {n for n in private if hasattr(compat.BaseTuner, n)}
                assert overridden <= set(compat.TUNER_HOOKS), f"{klass.__name__} overrides unlisted BaseTuner hooks"


def test_5_peft_model_calls_the_hooks():
    model = _tiny()
    x = torch.randn(4, 10)
    # _enable_peft_forward_hooks: PeftModel enters it around a forward with the call's keywords (ours refuses a
    # mixed-adapter batch in training mode), and drops adapter_names before calling the base model
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(x, adapter_names=["default"] * 4)
    model.eval()
    assert torch.allclose(model(x, adapter_names=["default"] * 4), model(x), atol=1e-6), \
        _touchpoint(5, "PeftModel enters the tuner's _enable_peft_forward_hooks")
    # _remove_adapter_name_from_key: the groups are saved without the adapter name
    keys = list(get_peft_model_state_dict(model))
    assert any(".tcurlora_groups.0." in k for k in keys) and not any("default" in k for k in keys), keys
    # _cast_adapter_dtype: PeftModel calls it after injection (bfloat16 groups upcast to float32 unless asked not to)
    for autocast, dtype in ((True, torch.float32), (False, torch.bfloat16)):
        half = get_peft_model(TinyMLP().to(torch.bfloat16), TCURLoraConfig(r=2, target_modules=["lin1", "lin2"]),
                              autocast_adapter_dtype=autocast)
        assert {p.dtype for p in half.base_model.tcurlora_groups.parameters()} == {dtype}, \
            _touchpoint(5, "PeftModel calls BaseTuner._cast_adapter_dtype")
    # _unload_and_optionally_merge: merge_and_unload goes through it (the forward-scope hooks are removed)
    tuner = model.base_model
    merged = model.merge_and_unload()
    assert "_forward_scope" not in tuner.__dict__ and not any(isinstance(m, compat.BaseTunerLayer)
                                                              for m in merged.modules())


def test_6_base_tuner_layer_private_members():
    assert _params(compat.BaseTunerLayer._cast_input_dtype) == ["x", "dtype"], \
        _touchpoint(6, "BaseTunerLayer._cast_input_dtype")
    assert _params(compat.BaseTunerLayer._move_adapter_to_device_of_base_layer)[:2] == ["adapter_name", "device"], \
        _touchpoint(6, "BaseTunerLayer._move_adapter_to_device_of_base_layer")
    model = _tiny()
    layer = model.base_model.model.lin1
    x = torch.randn(3, 16, dtype=torch.float64)
    assert compat.cast_input_dtype(layer, x, torch.float32).dtype == torch.float32
    layer.cast_input_dtype_enabled = False  # what peft.helpers.disable_input_dtype_casting sets
    assert compat.cast_input_dtype(layer, x, torch.float32) is x
    for private, public in compat.LAYER_STATE.items():
        assert isinstance(inspect.getattr_static(compat.BaseTunerLayer, public), property)
        for value in (["probe"], True):
            setattr(layer, private, value)
            assert getattr(layer, public) == value, _touchpoint(6, f"BaseTunerLayer.{public} reads {private}")


def test_7_auxiliary_wrappers():
    model = _tiny(modules_to_save=["head"])
    wrapper = model.base_model.model.head
    assert isinstance(wrapper, compat.ModulesToSaveWrapper), _touchpoint(7, "ModulesToSaveWrapper")
    assert issubclass(compat.ModulesToSaveWrapper, compat.AuxiliaryTrainingWrapper)
    assert compat.auxiliary_adapters(wrapper) == {"default"}, _touchpoint(7, "AuxiliaryTrainingWrapper._adapters")
    assert isinstance(wrapper.original_module, nn.Linear)


def test_8_buffer_dict():
    holder = nn.Module()
    holder.buffers_ = compat.BufferDict({}, persistent=True)
    holder.buffers_["a"] = torch.ones(2)
    assert list(holder.buffers_.keys()) == ["a"] and "buffers_.a" in holder.state_dict(), \
        _touchpoint(8, "peft.tuners._buffer_dict.BufferDict(persistent=True)")


class _WithBlock(TinyMLP):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(2, 2), nn.ReLU())  # no .weight: what BaseTuner._replace_module copies

    def forward(self, x):
        return self.block(super().forward(x))


def test_9_replace_module_fix_for_blocks_in_modules_to_save():
    for cls in (TCURLoraModel, LoraPTModel, HyPSModel):
        assert cls.__mro__.index(compat.MonaiFriendlyTunerMixin) < cls.__mro__.index(compat.BaseTuner)
    model = get_peft_model(_WithBlock(), TCURLoraConfig(r=2, target_modules=["lin1", "lin2"],
                                                       modules_to_save=["block"]))
    x = torch.randn(2, 10)
    expected = model(x)
    plain = model.merge_and_unload()
    assert isinstance(plain.block, nn.Sequential) and torch.allclose(plain(x), expected, atol=1e-5)


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("transposed", [False, True])
def test_10_torch_conv_helpers(dim, transposed):
    cls = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[dim - 1] if transposed else \
        (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dim - 1]
    conv = cls(2, 3, 3, stride=2, padding=1)
    x = torch.randn(1, 2, *[5] * dim)
    assert compat.is_conv_transpose(conv) is transposed
    weight = 2 * conv.weight
    with torch.no_grad():
        if not transposed:
            fn = (F.conv1d, F.conv2d, F.conv3d)[dim - 1]
            assert torch.allclose(compat.conv_forward(conv, x, weight, None),
                                  fn(x, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups))
            return
        fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dim - 1]
        for size in (None, [10] * dim):
            padding = compat.transposed_output_padding(conv, x, size)
            out = fn(x, conv.weight, conv.bias, conv.stride, conv.padding, padding, conv.groups, conv.dilation)
            assert torch.allclose(out, conv(x, output_size=size)), _touchpoint(10, "_ConvTransposeNd._output_padding")



def test_11_get_pattern_key_matches_rank_pattern_keys_as_lora_does():
    keys = ["conv1.conv", "^vit\\.blocks\\.0\\.attn\\.qkv", "blocks\\.[12]\\.mlp\\..*"]
    resolve = compat.get_pattern_key
    assert resolve(keys, "encoder1.layer.conv1.conv") == "conv1.conv", _touchpoint(11, "get_pattern_key suffix")
    assert resolve(keys, "vit.blocks.0.attn.qkv") == keys[1], _touchpoint(11, "get_pattern_key anchored regex")
    assert resolve(keys, "x.vit.blocks.0.attn.qkv") == "x.vit.blocks.0.attn.qkv", _touchpoint(11, "no match")
    assert resolve(keys, "vit.blocks.2.mlp.linear1") == keys[2], _touchpoint(11, "get_pattern_key regex")
    assert resolve(keys, "encoder1.layer.xconv1.conv") == "encoder1.layer.xconv1.conv", _touchpoint(11, "dot boundary")

_PRIVATE_USES = re.compile(
    r"from peft\.(tuners|utils\.other|mapping)\b|import peft\.(tuners|utils|mapping)\b|\._conv_forward\(|"
    r"\._output_padding\(|_ConvTransposeNd|\._cast_input_dtype\(|\._move_adapter_to_device_of_base_layer\(|"
    r"PeftType\._|\"_adapters\"|PeftModel\.(from_pretrained|load_adapter) =")


def test_the_package_reaches_peft_internals_only_through_the_compat_module():
    offending = []
    for path in sorted((REPO / "peft_tensor").rglob("*.py")):
        if path.name == "_peft_compat.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if _PRIVATE_USES.search(line.split("#")[0]):
                offending.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offending == [], "\n".join(offending)
