"""Loading a HyPS adapter runs no SVD: the factors are built empty and filled from the file, exactly (as the tensor
methods' groups are, tests/tuners/test_parity.py). Every loader (``PeftModel.from_pretrained`` / ``load_adapter``,
``peft_tensor.from_pretrained`` / ``load_adapter_checked``, ``low_cpu_mem_usage=True``, PEFT's bare
``set_peft_model_state_dict``), Linear and convolution layers; a file that lacks a tensor is refused by name."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

import peft_tensor
import peft_tensor.tuners.hyps.layer as hyps_layer
from peft_tensor.errors import AdapterLoadError
from peft_tensor.tuners._loading_context import loading_adapter
from peft_tensor.tuners.hyps import HyPSConfig, principal_factors
from tests._models import TinyMLP
from tests.tuners._helpers import mlp_input
from tests.tuners.hyps._hyps import hyps_layers
from tests.tuners.hyps.test_hyps_conv import NET_TARGETS, TinyConvNet

MLP_TARGETS = ["lin0", "lin1", "lin2", "lin3"]

# name -> (model builder, input, config kwargs)
CASES = {
    "linear": (TinyMLP, lambda: mlp_input()["x"], dict(target_modules=MLP_TARGETS, modules_to_save=["head"])),
    "linear_parallel_only": (TinyMLP, lambda: mlp_input()["x"], dict(target_modules=MLP_TARGETS, serial=False)),
    # per-layer ranks: the empty factors take each layer's own rank
    "linear_rank_pattern": (TinyMLP, lambda: mlp_input()["x"], dict(target_modules=MLP_TARGETS, r=3,
                                                                    rank_pattern={"lin1": 1, "lin3": 5})),
    # Conv3d, ConvTranspose3d (k2 s2) and a bias-free Conv3d
    "conv": (TinyConvNet, lambda: torch.randn(3, 2, 3, 4, 3, generator=torch.Generator().manual_seed(1)),
             dict(target_modules=NET_TARGETS)),
}


def _trained(case, tmp_path, **kw):
    """A non-trivial adapter of ``case`` saved to ``tmp_path``; returns (input, its output)."""
    build, make_x, cfg = CASES[case]
    torch.manual_seed(0)
    pm = get_peft_model(build(), HyPSConfig(init_weights=False, **cfg, **kw))
    x = make_x()
    with torch.no_grad():
        y = pm(x)
    pm.save_pretrained(tmp_path)
    return x, y


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_loading_runs_no_svd_and_reproduces_the_outputs_exactly(case, low_cpu_mem_usage, tmp_path, request):
    x, expected = _trained(case, tmp_path)
    build = CASES[case][0]
    request.getfixturevalue("no_decomposition")
    with pytest.raises(AssertionError, match="SVD"):  # the patch is live: a fresh adapter needs the SVD
        get_peft_model(build(), HyPSConfig(**CASES[case][2]))

    loaded = PeftModel.from_pretrained(build(), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
    assert not any(t.is_meta for t in loaded.state_dict().values())
    assert not any(layer.hyps_pending for layer in hyps_layers(loaded))
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    loaded.load_adapter(tmp_path, adapter_name="second", low_cpu_mem_usage=low_cpu_mem_usage)
    loaded.set_adapter("second")
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)

    checked = peft_tensor.from_pretrained(build(), str(tmp_path), low_cpu_mem_usage=low_cpu_mem_usage)
    peft_tensor.load_adapter_checked(checked, str(tmp_path), "second", low_cpu_mem_usage=low_cpu_mem_usage)
    with torch.no_grad():
        assert torch.equal(checked(x), expected)
        checked.set_adapter("second")
        assert torch.equal(checked(x), expected)
    # a loaded adapter saves what it loaded, bit for bit
    checked.save_pretrained(tmp_path / "again", selected_adapters=["second"])
    first, again = load_file(tmp_path / "adapter_model.safetensors"), load_file(
        tmp_path / "again" / "second" / "adapter_model.safetensors")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


def test_peft_bare_loader_fills_an_empty_low_cpu_mem_usage_adapter(tmp_path, request):
    x, expected = _trained("conv", tmp_path)
    request.getfixturevalue("no_decomposition")
    empty = get_peft_model(TinyConvNet(), HyPSConfig(target_modules=NET_TARGETS), low_cpu_mem_usage=True)
    assert any(p.is_meta for p in empty.parameters())
    set_peft_model_state_dict(empty, load_file(tmp_path / "adapter_model.safetensors"), low_cpu_mem_usage=True)
    assert not any(t.is_meta for t in empty.state_dict().values())
    with torch.no_grad():
        assert torch.equal(empty(x), expected)


def test_an_adapter_built_for_a_file_but_used_first_is_initialised_then_once(monkeypatch):
    calls = []

    def counted(weight, r):
        calls.append(tuple(weight.shape))
        return principal_factors(weight, r)

    monkeypatch.setattr(hyps_layer, "principal_factors", counted)
    x = mlp_input()["x"]
    with torch.no_grad():
        y0 = TinyMLP()(x)
    with loading_adapter():
        pm = get_peft_model(TinyMLP(), HyPSConfig(target_modules=MLP_TARGETS))
        keys = set(pm.state_dict())  # the key read PEFT's loader makes before loading: no SVD
    assert not calls and any(k.endswith("hyps_A0.default") for k in keys)
    assert all(layer.hyps_pending for layer in hyps_layers(pm))
    with torch.no_grad():
        assert torch.equal(pm(x), y0)  # nothing was loaded: the SVD runs now, and the adapter is an identity
        assert torch.equal(pm(x), y0)
    assert len(calls) == len(MLP_TARGETS) and not any(layer.hyps_pending for layer in hyps_layers(pm))
    layer = pm.base_model.model.lin1
    a0, b0 = principal_factors(layer.get_base_layer().weight, 2)
    assert torch.equal(layer.hyps_A0["default"], a0) and torch.equal(layer.hyps_B["default"], b0)


@pytest.mark.parametrize("key", ["hyps_A", "hyps_B", "hyps_A0", "hyps_B0", "hyps_down.weight", "hyps_up.weight"])
def test_a_file_missing_a_tensor_of_a_layer_is_refused_naming_it(key, tmp_path):
    _trained("linear", tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    saved = load_file(path)
    dropped = f"base_model.model.lin2.{key}"
    assert dropped in saved, sorted(saved)
    save_file({k: v for k, v in saved.items() if k != dropped}, path)
    with pytest.raises(AdapterLoadError, match=rf"'base_model\.model\.lin2'.*{dropped.replace('.', '[.]')}"):
        PeftModel.from_pretrained(TinyMLP(), tmp_path)
    with pytest.raises(AdapterLoadError, match=dropped.replace(".", "[.]")):
        peft_tensor.from_pretrained(TinyMLP(), str(tmp_path), low_cpu_mem_usage=True)


def test_a_file_missing_a_whole_layer_is_refused_naming_its_tensors(tmp_path):
    _trained("conv", tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    saved = load_file(path)
    save_file({k: v for k, v in saved.items() if ".up." not in k}, path)
    with pytest.raises(AdapterLoadError, match=r"'base_model\.model\.up'.*base_model\.model\.up\.hyps_A0"):
        PeftModel.from_pretrained(TinyConvNet(), tmp_path)


def test_weighted_adapter_is_built_without_an_svd(monkeypatch):
    torch.manual_seed(0)
    pm = get_peft_model(TinyConvNet(), HyPSConfig(target_modules=NET_TARGETS, serial=False, init_weights=False),
                        adapter_name="a")
    pm.add_adapter("b", HyPSConfig(target_modules=NET_TARGETS, serial=False, init_weights=False, r=1))

    def refuse(*args, **kwargs):
        raise AssertionError("add_weighted_adapter ran an SVD")

    monkeypatch.setattr(hyps_layer, "principal_factors", refuse)
    pm.add_weighted_adapter(["a", "b"], [0.3, -0.7], "mix")
    for name in NET_TARGETS:
        layer = getattr(pm.base_model.model, name)
        assert "mix" not in layer.hyps_pending
        torch.testing.assert_close(layer.get_delta_weight("mix"),
                                   0.3 * layer.get_delta_weight("a") - 0.7 * layer.get_delta_weight("b"),
                                   atol=1e-6, rtol=1e-5)
