"""The whole PEFT lifecycle, run as one generic suite over a table of cases (PEFT's own testing style).

Each case: a model builder, an input builder and a config factory. Cases cover a test-sized UNETR (real module
names) with both groupings, a small generic torch model, and transformers models built from a config.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import peft_tensor
from peft_tensor import HyPSConfig, LoraPTConfig, TCURLoraConfig
from tests._models import UNETR_DECODER, UNETR_TARGETS, TinyMLP, tiny_bert, tiny_unetr, tiny_vit
from tests.tuners._helpers import bert_input, mlp_input, model_output, trainable_params, unetr_input, vit_input


# the convolutions of UNETR's decoder2-5 blocks (suffixes found in no other UNETR block)
UNETR_DECODER_CONVS = ["transp_conv.conv", "conv_block.conv1.conv", "conv_block.conv2.conv", "conv_block.conv3.conv"]


# name -> (model builder, input builder, config factory(**overrides))
CASES = {
    "tcurlora-unetr-paper": (tiny_unetr, unetr_input,
                             lambda **kw: TCURLoraConfig(r=4, target_modules=UNETR_TARGETS, grouping="paper",
                                                         **kw)),
    "tcurlora-unetr-shape": (tiny_unetr, unetr_input,
                             lambda **kw: TCURLoraConfig(r=4, target_modules=UNETR_TARGETS, grouping="by_shape",
                                                         **kw)),
    "lorapt-unetr-paper": (tiny_unetr, unetr_input,
                           lambda **kw: LoraPTConfig(r=2, target_modules=UNETR_TARGETS, grouping="paper", **kw)),
    # whole network (issue 12): the paper's Linear groups plus one kernel-position group per decoder convolution
    # (ConvTranspose3d 2x2x2, Conv3d 3x3x3) and the 1x1x1 convolutions grouped by shape
    "tcurlora-unetr-full": (tiny_unetr, unetr_input,
                            lambda **kw: TCURLoraConfig(r=4, target_modules=UNETR_TARGETS + UNETR_DECODER_CONVS,
                                                        grouping="paper", **kw)),
    "tcurlora-mlp": (TinyMLP, mlp_input,
                     lambda **kw: TCURLoraConfig(r=3, target_modules=["lin1", "lin2", "lin3"], **kw)),
    "lorapt-mlp": (TinyMLP, mlp_input,
                   lambda **kw: LoraPTConfig(r=3, target_modules=["lin1", "lin2", "lin3"], **kw)),
    "lorapt-mlp-diag": (TinyMLP, mlp_input,
                        lambda **kw: LoraPTConfig(r=3, target_modules=["lin0", "lin1", "lin2", "lin3"],
                                                  core="diagonal", svd_method="full", core_gain=0.2, **kw)),
    # the recipes' LoRA-PT form: one scale per principal component, the core at a fifth of its gain
    "lorapt-mlp-percomp": (TinyMLP, mlp_input,
                           lambda **kw: LoraPTConfig(r=3, target_modules=["lin1", "lin2", "lin3"],
                                                     factor_scale="per_component", core_gain=0.2, **kw)),
    "tcurlora-vit": (tiny_vit, vit_input,
                     lambda **kw: TCURLoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], **kw)),
    # HyPS with its parallel branch only runs the whole matrix (the serial branch cannot merge, by design: its
    # specifics are in tests/tuners/hyps/test_hyps.py)
    "hyps-unetr": (tiny_unetr, unetr_input,
                   lambda **kw: HyPSConfig(r=2, target_modules=UNETR_TARGETS, serial=False, **kw)),
    "hyps-mlp": (TinyMLP, mlp_input,
                 lambda **kw: HyPSConfig(r=3, target_modules=["lin1", "lin2", "lin3"], serial=False, **kw)),
    "lorapt-bert": (tiny_bert, bert_input,
                    lambda **kw: LoraPTConfig(r=2, target_modules=["query", "value", "intermediate.dense",
                                                                   "output.dense"], **kw)),
}
FAST = ["tcurlora-unetr-paper", "lorapt-unetr-paper", "tcurlora-mlp", "lorapt-mlp", "lorapt-mlp-percomp"]
FAST_ALL = FAST + ["hyps-unetr", "hyps-mlp"]  # FAST alone where a test inspects the tensor groups themselves


def _loss(y):
    return (y.float() ** 2).mean()


def _group_params(pm, adapter="default"):
    """The adapter's own trainable state: tuner-level groups (tCURLoRA, LoRA-PT) or per-layer factors (HyPS)."""
    prefix = pm.base_model.prefix
    return [p for n, p in pm.named_parameters()
            if prefix in n and (f".{adapter}." in n or n.endswith(f".{adapter}"))]


@pytest.mark.parametrize("case", list(CASES))
def test_identity_at_init_and_exact_counts(case):
    build, make_input, make_config = CASES[case]
    base = build()
    inputs = make_input()
    with torch.no_grad():
        expected = model_output(base, inputs)
    pm = get_peft_model(base, make_config())
    with torch.no_grad():
        got = model_output(pm, inputs)
    assert torch.equal(got, expected), "init_weights=True must leave the network's output bit for bit unchanged"
    # shared group tensors are counted once, and they are all there is to train
    trainable, _ = pm.get_nb_trainable_parameters()
    assert trainable == sum(p.numel() for p in _group_params(pm)) > 0
    assert len(trainable_params(pm)) == len(_group_params(pm)), "only the adapter's own state trains"


@pytest.mark.parametrize("case", list(CASES))
def test_every_factor_gets_gradient_and_step_changes_output(case):
    build, make_input, make_config = CASES[case]
    pm = get_peft_model(build(), make_config())
    pm.train()
    inputs = make_input()
    with torch.no_grad():
        before = model_output(pm, inputs).clone()
    _loss(model_output(pm, inputs)).backward()
    for name, p in pm.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"
        else:
            assert p.grad is None, f"frozen {name} received a gradient"
    torch.optim.Adam(trainable_params(pm).values(), lr=1e-2).step()
    pm.eval()
    with torch.no_grad():
        after = model_output(pm, inputs)
    assert not torch.allclose(after, before, atol=1e-6), "an optimiser step did not change the output"


@pytest.mark.parametrize("case", FAST)
def test_group_update_computed_once_per_forward_and_never_stale(case):
    build, make_input, make_config = CASES[case]
    pm = get_peft_model(build(), make_config())
    inputs = make_input()
    groups = list(pm.base_model.groups("default"))
    calls = {"forward": 0, "factors": 0}
    for g in groups:
        orig_compute, orig_factors = g.compute_factors, g.factors

        def counted_compute(orig=orig_compute):
            calls["forward"] += 1
            return orig()

        def counted_factors(orig=orig_factors):
            calls["factors"] += 1
            return orig()

        g.compute_factors, g.factors = counted_compute, counted_factors
    opt = torch.optim.SGD(trainable_params(pm).values(), lr=0.5)
    _loss(model_output(pm, inputs)).backward()
    assert calls["forward"] == len(groups), "each group's factors must be computed once per forward pass"
    # the factor node saves no tensors: its backward re-evaluates the (small) factors once per group
    assert calls["factors"] == 2 * len(groups)
    # gradient accumulation: a second forward/backward before the step must work and accumulate
    g1 = [p.grad.clone() for p in trainable_params(pm).values()]
    _loss(model_output(pm, inputs)).backward()
    for a, p in zip(g1, trainable_params(pm).values()):
        torch.testing.assert_close(p.grad, 2 * a, rtol=1e-4, atol=1e-7)
    opt.step()
    # right after the step, under no_grad, the output reflects the new parameters: compare with a merged copy
    with torch.no_grad():
        live = model_output(pm, inputs).clone()
        pm.merge_adapter()
        merged = model_output(pm, inputs).clone()
        pm.unmerge_adapter()
        again = model_output(pm, inputs)
    torch.testing.assert_close(live, merged, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(again, live, atol=1e-5, rtol=1e-5)


def _perturbed(case, **overrides):
    build, make_input, make_config = CASES[case]
    return build, make_input, get_peft_model(build(), make_config(init_weights=False, **overrides))


@pytest.mark.parametrize("case", list(CASES))
def test_save_load_round_trip(case, tmp_path):
    build, make_input, pm = _perturbed(case)
    inputs = make_input()
    with torch.no_grad():
        expected = model_output(pm, inputs)
    pm.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) >= ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and not any(".default." in k for k in saved), "adapter names must not leak into saved keys"
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] in ("TCURLORA", "LORAPT", "HYPS") and cfg["peft_tensor_version"] == peft_tensor.__version__

    for trainable in (False, True):
        loaded = PeftModel.from_pretrained(build(), tmp_path, is_trainable=trainable)
        with torch.no_grad():
            torch.testing.assert_close(model_output(loaded, inputs), expected, atol=1e-6, rtol=1e-6)
        n_train, _ = loaded.get_nb_trainable_parameters()
        assert (n_train > 0) == trainable
    # the checked loader gives the same result
    loaded = peft_tensor.from_pretrained(build(), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(model_output(loaded, inputs), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", FAST_ALL)
def test_multiple_adapters_set_disable_delete(case, tmp_path):
    build, make_input, pm = _perturbed(case)
    inputs = make_input()
    base = build()
    with torch.no_grad():
        base_out = model_output(base, inputs)
        first = model_output(pm, inputs).clone()
    # a second, different adapter saved from another model, then loaded next to the first; build() reseeds, so the
    # seed that makes the second adapter's random init differ is set after it
    other_base = build()
    torch.manual_seed(123)
    other = get_peft_model(other_base, CASES[case][2](init_weights=False))
    with torch.no_grad():
        second = model_output(other, inputs).clone()
    assert not torch.allclose(second, first, atol=1e-4), "the second adapter must differ from the first"
    other.save_pretrained(tmp_path)
    pm.load_adapter(tmp_path, adapter_name="second")
    assert set(pm.peft_config) == {"default", "second"}
    with torch.no_grad():
        torch.testing.assert_close(model_output(pm, inputs), first, atol=1e-6, rtol=1e-6)  # still the active one
        pm.set_adapter("second")
        torch.testing.assert_close(model_output(pm, inputs), second, atol=1e-6, rtol=1e-6)
        with pm.disable_adapter():
            torch.testing.assert_close(model_output(pm, inputs), base_out, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(model_output(pm, inputs), second, atol=1e-6, rtol=1e-6)
    # only the active adapter's groups train
    assert all(p.requires_grad for p in _group_params(pm, "second"))
    assert not any(p.requires_grad for p in _group_params(pm, "default"))
    pm.set_adapter("default")
    assert all(p.requires_grad for p in _group_params(pm, "default"))
    pm.delete_adapter("second")
    assert set(pm.peft_config) == {"default"}
    assert not _group_params(pm, "second")
    assert not any(".second." in k for k in pm.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model_output(pm, inputs), first, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", FAST_ALL)
def test_merge_unmerge_merge_and_unload_exact(case):
    build, make_input, pm = _perturbed(case)
    inputs = make_input()
    base_weights = {n: p.detach().clone() for n, p in build().named_parameters()}
    with torch.no_grad():
        expected = model_output(pm, inputs).clone()
        pm.merge_adapter(safe_merge=True)
        torch.testing.assert_close(model_output(pm, inputs), expected, atol=1e-4, rtol=1e-4)
        pm.unmerge_adapter()
        torch.testing.assert_close(model_output(pm, inputs), expected, atol=1e-5, rtol=1e-5)
        # unmerge restores the base weights (to float32 rounding)
        for n, p in pm.get_base_model().named_parameters():
            key = n.replace(".base_layer", "")
            if key in base_weights:
                torch.testing.assert_close(p, base_weights[key], atol=1e-6, rtol=0)
        plain = pm.merge_and_unload()
        assert not any("base_layer" in n or "groups" in n for n, _ in plain.named_parameters())
        assert not plain._forward_pre_hooks, "unloading must remove the adapter's forward hook"
        torch.testing.assert_close(model_output(plain, inputs), expected, atol=1e-4, rtol=1e-4)


def test_base_weights_never_modified_by_training():
    build, make_input, pm = _perturbed("tcurlora-unetr-paper")
    before = {n: p.detach().clone() for n, p in pm.get_base_model().named_parameters() if not p.requires_grad}
    opt = torch.optim.Adam(trainable_params(pm).values(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        _loss(model_output(pm, make_input())).backward()
        opt.step()
    for n, p in pm.get_base_model().named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["tcurlora-mlp", "lorapt-mlp", "tcurlora-unetr-paper", "hyps-mlp"])
def test_low_precision_base_models(case, dtype):
    build, make_input, make_config = CASES[case]
    base = build().to(dtype)
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in make_input().items()}
    if case.endswith("unetr-paper") and dtype == torch.float16:
        pytest.skip("MONAI's instance norm has no float16 CPU kernel")
    with torch.no_grad():
        expected = model_output(base, inputs)
    pm = get_peft_model(base, make_config())
    assert all(p.dtype == torch.float32 for p in _group_params(pm)), "adapter state stays float32"
    with torch.no_grad():
        got = model_output(pm, inputs)
    assert got.dtype == dtype
    assert torch.equal(got, expected), "init_weights=True must leave the output bit for bit unchanged in any dtype"
    _loss(model_output(pm, inputs)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in _group_params(pm))


@pytest.mark.parametrize("case", ["tcurlora-mlp", "lorapt-mlp", "hyps-mlp"])
def test_autocast(case):
    build, make_input, make_config = CASES[case]
    pm = get_peft_model(build(), make_config(init_weights=False))
    inputs = make_input()
    with torch.no_grad():
        ref = model_output(pm, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model_output(pm, inputs)
        _loss(y).backward()
    torch.testing.assert_close(y.float(), ref, atol=5e-2, rtol=5e-2)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in _group_params(pm))


@pytest.mark.parametrize("make_config", [
    lambda: TCURLoraConfig(r=4, target_modules=UNETR_TARGETS, grouping="paper", modules_to_save=UNETR_DECODER),
    lambda: LoraPTConfig(r=2, target_modules=UNETR_TARGETS, grouping="paper", modules_to_save=UNETR_DECODER),
])
def test_modules_to_save_decoder(make_config, tmp_path):
    pm = get_peft_model(tiny_unetr(), make_config())
    inputs = unetr_input()
    names = list(trainable_params(pm))
    assert any("decoder2.modules_to_save.default" in n for n in names)
    assert not any(n.startswith("base_model.model.encoder") or ".vit." in n for n in names if "groups" not in n)
    _loss(model_output(pm, inputs)).backward()
    torch.optim.SGD(trainable_params(pm).values(), lr=0.1).step()
    with torch.no_grad():
        expected = model_output(pm, inputs)
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_unetr(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model_output(loaded, inputs), expected, atol=1e-6, rtol=1e-6)
        # merge_and_unload gives a plain UNETR carrying the trained decoder and the merged encoder update
        plain = loaded.merge_and_unload()
        assert type(plain).__name__ == "UNETR"
        assert not any("modules_to_save" in n or "base_layer" in n for n, _ in plain.named_modules())
        torch.testing.assert_close(model_output(plain, inputs), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("case", FAST_ALL)
def test_cuda_lifecycle(case, tmp_path):
    build, make_input, pm = _perturbed(case)
    inputs = make_input()
    with torch.no_grad():
        cpu_out = model_output(pm, inputs)
    pm = pm.to("cuda")
    # true float32 on the GPU: cuDNN's default TF32 convolutions differ from the CPU by ~1e-3 on their own
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    cuda_inputs = {k: v.cuda() for k, v in inputs.items()}
    with torch.no_grad():
        torch.testing.assert_close(model_output(pm, cuda_inputs).cpu(), cpu_out, atol=1e-4, rtol=1e-4)
    _loss(model_output(pm, cuda_inputs)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in _group_params(pm))
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build(), tmp_path)  # adapter saved on CUDA, loaded on CPU
    with torch.no_grad():
        torch.testing.assert_close(model_output(loaded, inputs), cpu_out, atol=1e-4, rtol=1e-4)
