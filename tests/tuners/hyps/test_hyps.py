"""HyPS on generic models: config, the two branches, the PEFT lifecycle, merging rules, dtypes, bad input.

SwinUNETR (the paper's network) and the full-size parameter counts are in tests/tuners/hyps/test_hyps_swinunetr.py.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils import PeftType
from safetensors.torch import load_file
from torch import nn

import peft_tensor.tuners.hyps  # noqa: F401  (registers HYPS with PEFT)
from peft_tensor.errors import MergeError, PeftTensorError, RankError, TargetModulesError
from peft_tensor.tuners.hyps import SWINUNETR_HYPS_TARGETS, HyPSConfig, HyPSModel, principal_factors
from tests._models import UNETR_TARGETS, TinyMLP, tiny_bert, tiny_unetr, tiny_vit
from tests.tuners.hyps._hyps import check_gradients, hyps_layers, loss
from tests.tuners._helpers import bert_input, mlp_input, model_output, trainable_params, unetr_input, vit_input

MLP_TARGETS = ["lin0", "lin1", "lin2", "lin3"]


# name -> (model builder, input builder, target_modules, modules_to_save)
CASES = {
    "mlp": (TinyMLP, mlp_input, MLP_TARGETS, ["head"]),
    "vit": (tiny_vit, vit_input, ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"], None),
    "bert": (tiny_bert, bert_input, ["query", "key", "value", "output.dense", "intermediate.dense"], None),
    "unetr": (tiny_unetr, unetr_input, UNETR_TARGETS, ["out.conv.conv"]),
}
LIGHT = ["mlp", "vit", "bert"]  # cheap enough for every lifecycle test; UNETR gets the core ones


def _config(case, **kw):
    _, _, targets, to_save = CASES[case]
    kw.setdefault("modules_to_save", to_save)
    kw.setdefault("target_modules", targets)
    return HyPSConfig(**kw)


def _adapter_factor_names(pm, adapter="default"):
    return [n for n, _ in pm.named_parameters() if any(f"hyps_{k}.{adapter}" in n for k in ("A", "B", "down", "up"))]


# ---------------------------------------------------------------------------------------------------------- config


def test_config_defaults_registration_and_round_trip(tmp_path):
    cfg = HyPSConfig(target_modules=SWINUNETR_HYPS_TARGETS)
    assert (cfg.r, cfg.d, cfg.scale, cfg.serial_scale, cfg.parallel, cfg.serial) == (2, 2, None, 0.5, True, True)
    assert cfg.peft_type == PeftType.HYPS == "HYPS"
    assert SWINUNETR_HYPS_TARGETS == ["attn.qkv", "attn.proj", "mlp.linear1", "mlp.linear2", "downsample.reduction"]
    assert HyPSConfig(target_modules=["x"], d=4).serial_scale == 0.25
    assert HyPSConfig(target_modules=["x"], scale=3).serial_scale == 3.0
    cfg.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "HYPS" and saved["r"] == 2 and saved["serial"] is True
    again = HyPSConfig.from_pretrained(tmp_path)
    assert again.to_dict() == cfg.to_dict()
    from dataclasses import fields

    for f in fields(HyPSConfig):
        if f.name in ("r", "d", "scale", "dropout", "parallel", "serial"):
            assert f.metadata.get("help"), f"field {f.name} needs a help text"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(parallel=False, serial=False), "both branches switched off"),
        (dict(d=0), "d .*positive integer"),
        (dict(d=1.5), "d .*positive integer"),
        (dict(r=0), "r must be a positive integer"),
        (dict(dropout=1.0), r"dropout must be a probability in \[0, 1\)"),
        (dict(scale=float("nan")), "scale must be a finite number"),
        (dict(target_modules=[]), "names no module"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    kwargs.setdefault("target_modules", ["lin1"])
    with pytest.raises(PeftTensorError, match=match):
        HyPSConfig(**kwargs)


def test_principal_factors_are_the_truncated_svd():
    torch.manual_seed(0)
    w = torch.randn(12, 7)
    a, b = principal_factors(w, 3)
    assert a.shape == (12, 3) and b.shape == (3, 7) and a.dtype == b.dtype == torch.float32
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    torch.testing.assert_close((a @ b).double(), (u[:, :3] * s[:3]) @ vh[:3], atol=1e-5, rtol=1e-5)
    # the two factors carry sqrt(S) each: A^T A = B B^T = diag(S_r)
    torch.testing.assert_close(a.T @ a, torch.diag(s[:3]).float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b @ b.T, torch.diag(s[:3]).float(), atol=1e-4, rtol=1e-4)
    a_full, b_full = principal_factors(w.half(), 7)  # float16 weights are decomposed in float64 too
    torch.testing.assert_close(a_full @ b_full, w.half().float(), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------- structure and init


@pytest.mark.parametrize("case", list(CASES))
def test_identity_at_init_and_counts(case):
    build, make_input, targets, _ = CASES[case]
    base = build()
    inputs = make_input()
    with torch.no_grad():
        expected = model_output(base, inputs)
    n_linear = {n for n, m in base.named_modules() if isinstance(m, nn.Linear)}
    pm = get_peft_model(base, _config(case, modules_to_save=None, r=2, d=3))
    with torch.no_grad():
        got = model_output(pm, inputs)
    assert torch.equal(got, expected), "HyPS must be an exact identity at initialisation"
    layers = hyps_layers(pm)
    assert layers and len(layers) == len(pm.base_model.targeted_module_names) <= len(n_linear)
    expected_count = sum(2 * (lin.in_features + lin.out_features) + 2 * 3 * lin.out_features for lin in layers)
    assert pm.get_nb_trainable_parameters()[0] == expected_count
    assert set(trainable_params(pm)) == set(_adapter_factor_names(pm))


def test_branch_switches_and_parameter_layout():
    base = TinyMLP()
    par = get_peft_model(copy.deepcopy(base), _config("mlp", serial=False, modules_to_save=None))
    ser = get_peft_model(copy.deepcopy(base), _config("mlp", parallel=False, modules_to_save=None, d=4))
    for layer in hyps_layers(par):
        assert "default" in layer.hyps_A and "default" not in layer.hyps_down
    for layer in hyps_layers(ser):
        assert "default" in layer.hyps_down and "default" not in layer.hyps_A
    assert par.get_nb_trainable_parameters()[0] == 2 * (10 + 16) + 3 * 2 * (16 + 16)
    assert ser.get_nb_trainable_parameters()[0] == 4 * 4 * 2 * 16
    # the initial factors are frozen buffers, saved with the adapter, not parameters
    lin1 = par.base_model.model.lin1
    assert "default" in dict(lin1.hyps_A0.items()) and not any("hyps_A0" in n for n, _ in par.named_parameters())
    assert any(k.endswith("hyps_A0.default") for k in par.state_dict())
    # serial branch: Down Kaiming-uniform (non-zero), Up zeros
    layer = ser.base_model.model.lin1
    assert layer.hyps_down["default"].weight.abs().sum() > 0 and not layer.hyps_up["default"].weight.any()


def test_base_weights_untouched_and_initial_factors_match_svd():
    base = TinyMLP()
    w = base.lin1.weight.detach().clone()
    pm = get_peft_model(base, _config("mlp", modules_to_save=None))
    layer = pm.base_model.model.lin1
    assert torch.equal(layer.get_base_layer().weight, w)
    a0, b0 = principal_factors(w, 2)
    torch.testing.assert_close(layer.hyps_A0["default"] @ layer.hyps_B0["default"], a0 @ b0)
    assert torch.equal(layer.hyps_A["default"], layer.hyps_A0["default"])


# ------------------------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("case", list(CASES))
def test_every_factor_gets_gradient_after_one_step(case):
    build, make_input, _, _ = CASES[case]
    overrides = {}
    if case == "unetr":
        # In a randomly initialised ViT the softmax is near-uniform, so attn.out_proj sees (almost) the same vector at
        # every token and a d=2 ReLU bottleneck can be dead for all of them at once: a property of the random test
        # network, not of the method. Test the other three target kinds there (SwinUNETR covers attn.proj).
        overrides["target_modules"] = ["attn.qkv", "mlp.linear1", "mlp.linear2"]
    pm = get_peft_model(build(), _config(case, dropout=0.0, **overrides))
    inputs = make_input()
    pm.train()
    with torch.no_grad():
        before = model_output(pm, inputs).clone()
    opt = torch.optim.Adam(trainable_params(pm).values(), lr=1e-2)
    # step 1: Up starts at zero, so Down's first gradient is exactly zero (as LoRA's A); everything else moves
    loss(model_output(pm, inputs)).backward()
    check_gradients(pm, first_step=True)
    opt.step()
    opt.zero_grad()
    # step 2: every trainable factor (A, B, Down, Up) and the modules_to_save copies receive a non-zero gradient
    y = model_output(pm, inputs)
    loss(y).backward()
    factors = _adapter_factor_names(pm)
    assert {k for n in factors for k in ("hyps_A.", "hyps_B.", "hyps_down.", "hyps_up.") if k in n} == {
        "hyps_A.", "hyps_B.", "hyps_down.", "hyps_up."}
    check_gradients(pm, where=" after one step")
    assert not torch.allclose(y.detach(), before, atol=1e-6), "an optimiser step did not change the output"


def test_base_weights_never_modified_by_training():
    pm = get_peft_model(TinyMLP(), _config("mlp", init_weights=False))
    frozen = {n: p.detach().clone() for n, p in pm.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD(trainable_params(pm).values(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        loss(model_output(pm, mlp_input())).backward()
        opt.step()
    for n, p in pm.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    with pm.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(model_output(pm, mlp_input()), model_output(TinyMLP(), mlp_input()), atol=0, rtol=0)


def test_dropout_keeps_identity_at_init_and_is_off_in_eval():
    base = TinyMLP()
    inputs = mlp_input()
    with torch.no_grad():
        expected = model_output(base, inputs)
    pm = get_peft_model(base, _config("mlp", dropout=0.5, modules_to_save=None))
    pm.train()
    with torch.no_grad():
        assert torch.equal(model_output(pm, inputs), expected)  # both parallel paths see the same dropped input
    pm2 = get_peft_model(TinyMLP(), _config("mlp", dropout=0.5, init_weights=False, modules_to_save=None))
    pm2.eval()
    with torch.no_grad():
        assert torch.equal(model_output(pm2, inputs), model_output(pm2, inputs))
        pm2.train()
        assert not torch.equal(model_output(pm2, inputs), model_output(pm2, inputs))


# -------------------------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("case", list(CASES))
def test_save_load_round_trip(case, tmp_path):
    build, make_input, _, _ = CASES[case]
    torch.manual_seed(0)
    pm = get_peft_model(build(), _config(case, init_weights=False))
    inputs = make_input()
    with torch.no_grad():
        expected = model_output(pm, inputs)
    pm.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and not any(".default" in k for k in saved)
    assert any(k.endswith("hyps_A0") for k in saved) and any(k.endswith("hyps_B0") for k in saved)
    assert not any("base_layer" in k for k in saved), "base weights must not be saved with the adapter"
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "HYPS" and cfg["peft_tensor_version"]

    for trainable in (False, True):
        loaded = PeftModel.from_pretrained(build(), tmp_path, is_trainable=trainable)
        with torch.no_grad():
            torch.testing.assert_close(model_output(loaded, inputs), expected, atol=1e-6, rtol=1e-6)
        n_train, _ = loaded.get_nb_trainable_parameters()
        assert (n_train == pm.get_nb_trainable_parameters()[0]) if trainable else (n_train == 0)


def test_load_uses_saved_initial_factors_not_a_fresh_svd(tmp_path):
    """Singular vectors have arbitrary signs: the saved A0/B0 must win over whatever SVD the loader computes."""
    pm = get_peft_model(TinyMLP(), _config("mlp", init_weights=False))
    with torch.no_grad():
        expected = model_output(pm, mlp_input())
        for layer in hyps_layers(pm):  # flip a sign pair: same A0 B0 product, different factors
            for t in (layer.hyps_A0["default"], layer.hyps_A["default"]):
                t[:, 0].neg_()
            for t in (layer.hyps_B0["default"], layer.hyps_B["default"]):
                t[0].neg_()
        torch.testing.assert_close(model_output(pm, mlp_input()), expected, atol=1e-6, rtol=1e-6)
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(TinyMLP(), tmp_path)
    layer = loaded.base_model.model.lin1
    assert torch.equal(layer.hyps_A0["default"], pm.base_model.model.lin1.hyps_A0["default"])
    with torch.no_grad():
        torch.testing.assert_close(model_output(loaded, mlp_input()), expected, atol=1e-6, rtol=1e-6)


def test_low_cpu_mem_usage_load_and_direct_injection(tmp_path):
    from peft import inject_adapter_in_model

    pm = get_peft_model(TinyMLP(), _config("mlp", init_weights=False))
    with torch.no_grad():
        expected = model_output(pm, mlp_input())
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(TinyMLP(), tmp_path, low_cpu_mem_usage=True)
    assert not any(t.is_meta for t in loaded.state_dict().values())
    with torch.no_grad():
        torch.testing.assert_close(model_output(loaded, mlp_input()), expected, atol=1e-6, rtol=1e-6)
    # HyPS keeps no cross-layer state, so PEFT's bare injection works too
    model = inject_adapter_in_model(_config("mlp", modules_to_save=None), TinyMLP())
    assert len(hyps_layers(model)) == 4
    with torch.no_grad():
        assert torch.equal(model_output(model, mlp_input()), model_output(TinyMLP(), mlp_input()))


def test_checked_loader_rejects_another_network(tmp_path):
    import peft_tensor

    get_peft_model(TinyMLP(), _config("mlp", init_weights=False)).save_pretrained(tmp_path)
    with pytest.raises(PeftTensorError, match="lin"):
        peft_tensor.from_pretrained(TinyMLP(width=24), str(tmp_path))


# ------------------------------------------------------------------------------- multiple adapters / disable


@pytest.mark.parametrize("case", LIGHT)
def test_multiple_adapters_set_disable_delete(case, tmp_path):
    build, make_input, _, _ = CASES[case]
    inputs = make_input()
    with torch.no_grad():
        base_out = model_output(build(), inputs)
    torch.manual_seed(1)
    pm = get_peft_model(build(), _config(case, init_weights=False))
    torch.manual_seed(2)
    other = get_peft_model(build(), _config(case, init_weights=False, r=1, d=3, modules_to_save=None))
    with torch.no_grad():
        first = model_output(pm, inputs).clone()
        second = model_output(other, inputs).clone()
    other.save_pretrained(tmp_path)
    pm.load_adapter(tmp_path, adapter_name="second")
    assert set(pm.peft_config) == {"default", "second"}
    with torch.no_grad():
        torch.testing.assert_close(model_output(pm, inputs), first, atol=1e-6, rtol=1e-6)
        pm.set_adapter("second")
        torch.testing.assert_close(model_output(pm, inputs), second, atol=1e-6, rtol=1e-6)
        with pm.disable_adapter():
            torch.testing.assert_close(model_output(pm, inputs), base_out, atol=0, rtol=0)
        torch.testing.assert_close(model_output(pm, inputs), second, atol=1e-6, rtol=1e-6)
    assert not any(p.requires_grad for n, p in pm.named_parameters() if ".default" in n and "hyps_" in n)
    pm.set_adapter("default")
    assert all(p.requires_grad for n, p in pm.named_parameters() if ".default" in n and "hyps_" in n)
    assert not any(p.requires_grad for n, p in pm.named_parameters() if ".second" in n)
    pm.delete_adapter("second")
    assert set(pm.peft_config) == {"default"}
    assert not any(".second" in k for k in pm.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model_output(pm, inputs), first, atol=1e-6, rtol=1e-6)


def test_add_adapter_in_memory_keeps_first_adapter_trainability():
    pm = get_peft_model(TinyMLP(), _config("mlp", init_weights=False, modules_to_save=None))
    before = {n for n, p in pm.named_parameters() if p.requires_grad}
    pm.add_adapter("two", _config("mlp", serial=False, modules_to_save=None))
    assert {n for n, p in pm.named_parameters() if p.requires_grad} == before
    pm.set_adapter("two")
    with torch.no_grad():  # the new adapter is an identity at init
        torch.testing.assert_close(model_output(pm, mlp_input()), model_output(TinyMLP(), mlp_input()), atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------- merging


@pytest.mark.parametrize("case", ["mlp", "vit", "unetr"])
def test_merge_unmerge_merge_and_unload_exact_parallel_only(case):
    build, make_input, _, _ = CASES[case]
    pm = get_peft_model(build(), _config(case, serial=False, init_weights=False, modules_to_save=None))
    inputs = make_input()
    base_weights = {n: p.detach().clone() for n, p in build().named_parameters()}
    with torch.no_grad():
        expected = model_output(pm, inputs).clone()
        pm.merge_adapter(safe_merge=True)
        assert all(layer.merged for layer in hyps_layers(pm))
        torch.testing.assert_close(model_output(pm, inputs), expected, atol=1e-5, rtol=1e-4)
        pm.unmerge_adapter()
        torch.testing.assert_close(model_output(pm, inputs), expected, atol=1e-5, rtol=1e-5)
        for n, p in pm.get_base_model().named_parameters():
            key = n.replace(".base_layer", "")
            if key in base_weights:
                torch.testing.assert_close(p, base_weights[key], atol=1e-6, rtol=0)
        plain = pm.merge_and_unload(safe_merge=True)
        assert type(plain) is type(build())
        assert not hyps_layers(plain)
        assert not any("hyps_" in n or "base_layer" in n for n, _ in plain.named_parameters())
        torch.testing.assert_close(model_output(plain, inputs), expected, atol=1e-5, rtol=1e-4)


def test_merged_weight_is_w_plus_ab_minus_a0b0():
    pm = get_peft_model(TinyMLP(), _config("mlp", serial=False, init_weights=False, modules_to_save=None))
    layer = pm.base_model.model.lin2
    w = layer.get_base_layer().weight.detach().clone()
    a, b, a0, b0 = (t.detach() for t in (layer.hyps_A["default"], layer.hyps_B["default"], layer.hyps_A0["default"],
                                         layer.hyps_B0["default"]))
    pm.merge_adapter()
    torch.testing.assert_close(layer.get_base_layer().weight, w + a @ b - a0 @ b0, atol=1e-6, rtol=0)
    # disabling the adapter while merged unmerges first, so the output is the base network's
    with pm.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(model_output(pm, mlp_input()), model_output(TinyMLP(), mlp_input()),
                                   atol=1e-6, rtol=1e-6)


def test_safe_merge_detects_nan():
    pm = get_peft_model(TinyMLP(), _config("mlp", serial=False, modules_to_save=None))
    layer = pm.base_model.model.lin1
    w = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        layer.hyps_A["default"][0, 0] = float("nan")
    with pytest.raises(MergeError, match="NaN/inf in the merged weight of HyPS adapter 'default'"):
        pm.merge_adapter(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, w) and not layer.merged


@pytest.mark.parametrize("how", ["merge_adapter", "merge_and_unload"])
@pytest.mark.parametrize("branches", [dict(), dict(parallel=False)])
def test_merge_with_serial_branch_raises_and_changes_nothing(how, branches):
    pm = get_peft_model(TinyMLP(), _config("mlp", init_weights=False, modules_to_save=None, **branches))
    weights = {n: p.detach().clone() for n, p in pm.named_parameters()}
    with torch.no_grad():
        expected = model_output(pm, mlp_input())
    with pytest.raises(MergeError, match=r"serial branch.*non-linear.*serial=False"):
        getattr(pm, how)()
    assert not any(layer.merged for layer in hyps_layers(pm))
    for n, p in pm.named_parameters():
        assert torch.equal(p, weights[n]), n
    with torch.no_grad():
        torch.testing.assert_close(model_output(pm, mlp_input()), expected, atol=0, rtol=0)
    # the layer-level merge refuses too, and unload() (no merge) still returns the plain base network
    with pytest.raises(MergeError, match="serial"):
        pm.base_model.model.lin1.merge()
    plain = pm.unload()
    assert isinstance(plain, TinyMLP) and not hyps_layers(plain)
    with torch.no_grad():
        torch.testing.assert_close(model_output(plain, mlp_input()), model_output(TinyMLP(), mlp_input()),
                                   atol=0, rtol=0)


def test_merge_with_mixed_adapters_checks_all_before_touching_weights():
    pm = get_peft_model(TinyMLP(), _config("mlp", serial=False, init_weights=False, modules_to_save=None))
    pm.add_adapter("serial", _config("mlp", init_weights=False, modules_to_save=None))
    w = pm.base_model.model.lin1.get_base_layer().weight.detach().clone()
    with pytest.raises(MergeError, match="'serial'"):
        pm.base_model.merge_adapter(adapter_names=["default", "serial"])
    with pytest.raises(MergeError, match="'serial'"):
        pm.base_model.model.lin1.merge(adapter_names=["default", "serial"])
    assert torch.equal(pm.base_model.model.lin1.get_base_layer().weight, w)
    pm.base_model.merge_adapter(adapter_names=["default"])  # the parallel-only adapter alone merges fine
    assert pm.base_model.model.lin1.merged_adapters == ["default"]


# ------------------------------------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["mlp", "bert"])
def test_low_precision_base_models(case, dtype):
    build, make_input, _, _ = CASES[case]
    base = build().to(dtype)
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in make_input().items()}
    with torch.no_grad():
        expected = model_output(base, inputs)
    pm = get_peft_model(base, _config(case, modules_to_save=None))
    factors = [p for n, p in pm.named_parameters() if n in set(_adapter_factor_names(pm))]
    assert factors and all(p.dtype == torch.float32 for p in factors), "adapter parameters stay float32"
    assert all(layer.hyps_A0["default"].dtype == torch.float32 for layer in hyps_layers(pm))
    with torch.no_grad():
        got = model_output(pm, inputs)
    assert got.dtype == dtype and torch.equal(got, expected)
    opt = torch.optim.SGD(factors, lr=0.1)
    loss(model_output(pm, inputs)).backward()
    opt.step()
    opt.zero_grad()
    loss(model_output(pm, inputs)).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0 for p in factors)
    with torch.no_grad():
        y = model_output(pm, inputs)
    assert y.dtype == dtype and torch.isfinite(y.float()).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_merge_and_no_autocast(dtype):
    base = TinyMLP().to(dtype)
    inputs = {"x": mlp_input()["x"].to(dtype)}
    pm = get_peft_model(base, _config("mlp", serial=False, init_weights=False, modules_to_save=None))
    with torch.no_grad():
        expected = model_output(pm, inputs).clone()
        plain = pm.merge_and_unload()
        assert plain.lin1.weight.dtype == dtype
        torch.testing.assert_close(model_output(plain, inputs), expected, atol=2e-2, rtol=2e-2)
    kept = get_peft_model(TinyMLP().to(dtype), _config("mlp", modules_to_save=None), autocast_adapter_dtype=False)
    assert all(p.dtype == dtype for n, p in kept.named_parameters() if "hyps_" in n)


def test_torch_autocast():
    pm = get_peft_model(TinyMLP(), _config("mlp", init_weights=False, modules_to_save=None))
    inputs = mlp_input()
    with torch.no_grad():
        ref = model_output(pm, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model_output(pm, inputs)
        loss(y).backward()
    torch.testing.assert_close(y.float(), ref, atol=5e-2, rtol=5e-2)
    assert all(p.grad is not None for n, p in pm.named_parameters() if "hyps_" in n and "hyps_down" not in n)


# --------------------------------------------------------------------------------------------------------- devices


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]),
])
def test_device_lifecycle(device, tmp_path):
    pm = get_peft_model(TinyMLP(), _config("mlp", init_weights=False))
    inputs = mlp_input()
    with torch.no_grad():
        cpu_out = model_output(pm, inputs)
    pm = pm.to(device)
    dev_inputs = {k: v.to(device) for k, v in inputs.items()}
    assert all(t.device.type == device for layer in hyps_layers(pm) for t in (layer.hyps_A0["default"],))
    with torch.no_grad():
        torch.testing.assert_close(model_output(pm, dev_inputs).cpu(), cpu_out, atol=1e-4, rtol=1e-4)
    loss(model_output(pm, dev_inputs)).backward()
    assert all(p.grad is not None for n, p in pm.named_parameters() if "hyps_A" in n)
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(TinyMLP().to(device), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model_output(loaded, dev_inputs).cpu(), cpu_out, atol=1e-4, rtol=1e-4)
    # adapters are built on the device of the base layer, SVD included
    fresh = get_peft_model(TinyMLP().to(device), _config("mlp", serial=False, modules_to_save=None))
    with torch.no_grad():
        torch.testing.assert_close(model_output(fresh, dev_inputs).cpu(), model_output(TinyMLP(), inputs),
                                   atol=1e-5, rtol=1e-5)
    if device == "cuda":
        half = get_peft_model(TinyMLP().to(device, torch.float16), _config("mlp", modules_to_save=None))
        y = model_output(half, {"x": dev_inputs["x"].half()})
        assert y.dtype == torch.float16
        loss(y).backward()


# ------------------------------------------------------------------------------------------------------ bad input


def test_targets_matching_nothing_list_available_linear_layers():
    model = TinyMLP()
    with pytest.raises(TargetModulesError, match=r"matched no module of TinyMLP.*'lin0', 'lin1'.*'head'"):
        get_peft_model(model, HyPSConfig(target_modules=["attn.qkv"]))
    assert not hyps_layers(model)
    expected = "matched no module of UNETR: pass target_modules=None for UNETR's preset, or name its layers.*'attn.qkv"
    with pytest.raises(TargetModulesError, match=expected) as err:
        get_peft_model(tiny_unetr(), HyPSConfig(target_modules=["q_proj"]))
    assert "'mlp.linear1'" in str(err.value) and "'attn.out_proj'" in str(err.value)


def test_unsupported_target_is_refused_by_name_and_type():
    class WithNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv3d(1, 4, 2)  # convolutions are fine (tests/tuners/hyps/test_hyps_conv.py) ...
            self.norm = nn.LayerNorm(4)  # ... a LayerNorm or a grouped convolution is not
            self.dw = nn.Conv3d(4, 4, 3, groups=4)
            self.mlp = nn.Linear(4, 4)

    model = WithNorm()
    match = r"matched 'norm' \(LayerNorm\), which HyPS cannot adapt .*: name the layers to adapt instead, e.g."
    with pytest.raises(TargetModulesError, match=match):
        get_peft_model(model, HyPSConfig(target_modules=["proj", "norm", "mlp"]))
    with pytest.raises(TargetModulesError, match=r"'dw' \(Conv3d, groups=4\).*groups=1.*exclude_modules"):
        get_peft_model(model, HyPSConfig(target_modules=["proj", "dw"]))
    assert not hyps_layers(model), "a refused config must leave the model untouched"


def test_rank_larger_than_layer_names_the_layer():
    model = TinyMLP()
    with pytest.raises(RankError, match=r"r=11 exceeds min\(out, in\)=10 of the Linear 'lin0' \(16 x 10\)"):
        get_peft_model(model, HyPSConfig(target_modules=MLP_TARGETS, r=11))
    assert not hyps_layers(model)
    # r only constrains the parallel branch
    get_peft_model(TinyMLP(), HyPSConfig(target_modules=MLP_TARGETS, r=11, parallel=False))


def test_tuner_class_contract():
    assert HyPSModel.prefix == "hyps_" and HyPSModel.target_module_mapping == {}
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.HYPS] is HyPSModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.HYPS] == "hyps_"


def test_recreating_an_adapter_on_a_layer_drops_the_switched_off_branch():
    pm = get_peft_model(TinyMLP(), _config("mlp", modules_to_save=None))
    layer = pm.base_model.model.lin1
    layer.update_layer("default", _config("mlp", serial=False, modules_to_save=None))
    assert "default" in layer.hyps_A and "default" not in layer.hyps_down and "default" not in layer.hyps_up


def test_factorisation_restores_the_thread_setting():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        principal_factors(torch.randn(20, 30), 2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
