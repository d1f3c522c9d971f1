"""Paths a PEFT LoRA user takes every day, on MONAI networks, for tCURLoRA, LoRA-PT and HyPS: each works exactly or
raises a clear error at the call (issue 9, section 2). PEFT's own generic suite runs in tests/test_peft_suite.py."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch.utils.checkpoint import checkpoint

from peft_tensor import HyPSConfig, LoraPTConfig, TCURLoraConfig
from peft_tensor.errors import MergeError
from tests._models import SWIN_TARGETS, UNETR_TARGETS, TinyMLP, tiny_unetr
from tests._numerics import UNETR_DEPTH, assert_float32_close

# method -> config factory on UNETR (module names of UNETR-B)
UNETR_CONFIGS = {
    "tcurlora": lambda **kw: TCURLoraConfig(r=4, target_modules=UNETR_TARGETS, grouping="paper", **kw),
    "lorapt": lambda **kw: LoraPTConfig(r=2, target_modules=UNETR_TARGETS, grouping="paper", **kw),
    "hyps": lambda **kw: HyPSConfig(r=2, d=4, target_modules=UNETR_TARGETS, **kw),
}
SWIN_CONFIGS = {
    "tcurlora": lambda **kw: TCURLoraConfig(r=2, target_modules=SWIN_TARGETS, **kw),
    "lorapt": lambda **kw: LoraPTConfig(r=2, target_modules=SWIN_TARGETS, **kw),
    "hyps": lambda **kw: HyPSConfig(r=2, d=4, target_modules=SWIN_TARGETS, **kw),
}
METHODS = list(UNETR_CONFIGS)


def _x(shape=(2, 1, 32, 32, 32), seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _trainable(pm):
    return [(n, p) for n, p in pm.named_parameters() if p.requires_grad]


def _train_steps(pm, x, steps=3, lr=1e-2):
    """Plain SGD steps; returns the gradients of every step (name -> grad)."""
    opt = torch.optim.SGD([p for _, p in _trainable(pm)], lr=lr)
    grads = []
    for _ in range(steps):
        opt.zero_grad()
        y = pm(x)
        (y.float() ** 2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in _trainable(pm) if p.grad is not None})
        opt.step()
    return grads


def _assert_same_grads(ga, gb):
    for a, b in zip(ga, gb):
        assert a.keys() == b.keys() and a, "the same parameters must receive gradients"
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------- gradient checkpointing
@pytest.mark.parametrize("method", METHODS)
def test_swinunetr_use_checkpoint_gives_the_same_gradients(method):
    """MONAI's SwinUNETR(use_checkpoint=True) uses non-reentrant checkpointing: same gradients over several steps."""
    from monai.networks.nets import SwinUNETR

    def build(use_checkpoint):
        torch.manual_seed(0)
        net = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1), norm_name="batch",
                        use_checkpoint=use_checkpoint)
        # batch norm in eval(): at 32^3 the deepest norm sees 1 voxel, which instance norm refuses; MONAI checkpoints
        # its Swin blocks whenever use_checkpoint is set, in eval mode too, and gradients flow the same
        return get_peft_model(net, SWIN_CONFIGS[method](init_weights=False)).eval()

    x = _x((1, 1, 32, 32, 32))
    _assert_same_grads(_train_steps(build(False), x), _train_steps(build(True), x))


@pytest.mark.parametrize("method", METHODS)
def test_reentrant_checkpointing_of_unetr_blocks_gives_the_same_gradients(method):
    """torch.utils.checkpoint(use_reentrant=True) around every ViT block of UNETR: same gradients, several steps."""

    def build(reentrant):
        pm = get_peft_model(tiny_unetr(), UNETR_CONFIGS[method](init_weights=False)).train()
        vit = pm.get_base_model().vit
        if reentrant:
            # as PEFT's enable_input_require_grads: re-entrant checkpointing back-propagates only to inputs
            vit.patch_embedding.register_forward_hook(lambda m, i, o: o.requires_grad_(True))
            for block in vit.blocks:
                block.forward = (lambda f: lambda h: checkpoint(f, h, use_reentrant=True))(block.forward)
        return pm

    x = _x((1, 1, 32, 32, 32))
    _assert_same_grads(_train_steps(build(False), x), _train_steps(build(True), x))


# -------------------------------------------------------------------------------------------- mixed batches
@pytest.mark.parametrize("method", METHODS)
def test_adapter_names_mixed_batch_matches_per_sample_runs(method):
    torch.manual_seed(0)
    pm = get_peft_model(tiny_unetr(), UNETR_CONFIGS[method](init_weights=False), adapter_name="a")
    torch.manual_seed(1)
    pm.add_adapter("b", UNETR_CONFIGS[method](init_weights=False))
    pm.eval()
    x = _x((3, 1, 32, 32, 32))
    with torch.no_grad():
        with pm.disable_adapter():
            base = pm(x)
        pm.set_adapter("a")
        ya = pm(x)
        pm.set_adapter("b")
        yb = pm(x)
        assert not torch.allclose(ya, yb), "the two adapters must differ for this test to mean anything"
        mixed = pm(x, adapter_names=["a", "__base__", "b"])
    # sub-batches of one sample against a batch of three: other GEMM / FFT kernels, so equal up to float32 rounding
    assert_float32_close(mixed[0], ya[0], depth=UNETR_DEPTH, msg="sample 0 (adapter a)")
    assert_float32_close(mixed[1], base[1], depth=UNETR_DEPTH, msg="sample 1 (base)")
    assert_float32_close(mixed[2], yb[2], depth=UNETR_DEPTH, msg="sample 2 (adapter b)")
    with pytest.raises(ValueError, match="unknown adapters"):
        pm(x, adapter_names=["a", "zzz", "b"])
    with pytest.raises(ValueError, match="got 2 and 3"):
        pm(x, adapter_names=["a", "b"])
    pm.train()
    with pytest.raises(ValueError, match="training mode"):
        pm(x, adapter_names=["a", "a", "b"])


# -------------------------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("method", METHODS)
def test_bfloat16_cast_after_get_peft_model_then_forward_merge_save(method, tmp_path):
    pm = get_peft_model(tiny_unetr(), UNETR_CONFIGS[method](init_weights=False, serial=False)
                        if method == "hyps" else UNETR_CONFIGS[method](init_weights=False))
    x = _x((1, 1, 32, 32, 32))
    with torch.no_grad():
        ref = pm(x)
    pm = pm.to(torch.bfloat16)
    with torch.no_grad():
        y = pm(x.bfloat16())
        assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
        torch.testing.assert_close(y.float(), ref, rtol=0.1, atol=0.1)
        pm.merge_adapter()
        merged = pm(x.bfloat16())
        pm.unmerge_adapter()
    torch.testing.assert_close(merged.float(), y.float(), rtol=0.05, atol=0.05)
    pm.save_pretrained(tmp_path)
    # autocast_adapter_dtype=False keeps the adapter in bfloat16 as it was saved (the default upcasts it to float32,
    # as PEFT does for LoRA, which changes the output within bfloat16 precision)
    loaded = PeftModel.from_pretrained(tiny_unetr().to(torch.bfloat16), tmp_path, autocast_adapter_dtype=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x.bfloat16()), y)


@pytest.mark.parametrize("method", METHODS)
def test_half_cast_of_a_monai_vit(method):
    """``.half()`` after get_peft_model on MONAI's ViT (the UNETR encoder): forward stays finite and close."""
    from monai.networks.nets import ViT

    torch.manual_seed(0)
    vit = ViT(in_channels=1, img_size=(16, 16, 16), patch_size=(8, 8, 8), hidden_size=32, mlp_dim=64, num_layers=2,
              num_heads=4)
    pm = get_peft_model(vit, UNETR_CONFIGS[method](init_weights=False))
    x = _x((1, 1, 16, 16, 16))
    with torch.no_grad():
        ref = pm(x)[0]
        pm.half()
        y = pm(x.half())[0]
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05)


# ------------------------------------------------------------------------------------ loading without decomposing
@pytest.mark.parametrize("method", ["tcurlora", "lorapt"])
@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_loading_runs_no_decomposition_and_low_cpu_mem_usage_works(method, low_cpu_mem_usage, tmp_path, request):
    pm = get_peft_model(tiny_unetr(), UNETR_CONFIGS[method](init_weights=False))
    x = _x((1, 1, 32, 32, 32))
    with torch.no_grad():
        expected = pm(x)
    pm.save_pretrained(tmp_path)
    request.getfixturevalue("no_decomposition")
    loaded = PeftModel.from_pretrained(tiny_unetr(), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
    assert not any(p.device.type == "meta" for p in loaded.parameters())
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    loaded.load_adapter(tmp_path, adapter_name="second", low_cpu_mem_usage=low_cpu_mem_usage)
    loaded.set_adapter("second")
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


@pytest.mark.parametrize("method", ["tcurlora", "lorapt"])
def test_get_peft_model_low_cpu_mem_usage_builds_meta_groups_filled_by_a_state_dict(method, tmp_path, request):
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    pm = get_peft_model(tiny_unetr(), UNETR_CONFIGS[method](init_weights=False))
    x = _x((1, 1, 32, 32, 32))
    with torch.no_grad():
        expected = pm(x)
    pm.save_pretrained(tmp_path)
    # PEFT's bare loader, outside any of the wrapped entry points: meta groups never decompose on its state_dict()
    request.getfixturevalue("no_decomposition")
    empty = get_peft_model(tiny_unetr(), UNETR_CONFIGS[method](), low_cpu_mem_usage=True)
    assert any(p.device.type == "meta" for p in empty.parameters())
    set_peft_model_state_dict(empty, load_file(tmp_path / "adapter_model.safetensors"), low_cpu_mem_usage=True)
    with torch.no_grad():
        assert torch.equal(empty(x), expected)


@pytest.mark.parametrize("method", ["tcurlora", "lorapt"])
def test_deferred_initialisation_is_an_explicit_context_not_a_mark_on_the_config(method, tmp_path, request):
    from peft_tensor.tuners._loading_context import is_loading_adapter, loading_adapter

    get_peft_model(tiny_unetr(), UNETR_CONFIGS[method](init_weights=False)).save_pretrained(tmp_path)
    # a config read from a file carries nothing hidden: outside a load it builds a fresh (decomposed) adapter
    config = type(UNETR_CONFIGS[method]()).from_pretrained(str(tmp_path))
    assert not [k for k in vars(config) if k.startswith("_")]
    fresh = get_peft_model(tiny_unetr(), config)
    assert all(g._pending is None for g in fresh.base_model.groups("default"))
    request.getfixturevalue("no_decomposition")
    with loading_adapter():
        assert is_loading_adapter()
        empty = get_peft_model(tiny_unetr(), UNETR_CONFIGS[method]())
        keys = set(empty.state_dict())  # the key read PEFT's loader makes: no decomposition
    assert not is_loading_adapter()
    groups = empty.base_model.groups("default")
    assert all(g._pending is not None for g in groups) and any("_groups.default." in k for k in keys)
    # the loaders leave the context on success and on failure
    PeftModel.from_pretrained(tiny_unetr(), tmp_path)
    assert not is_loading_adapter()
    import peft_tensor
    from peft_tensor.errors import AdapterLoadError

    with pytest.raises(AdapterLoadError):
        peft_tensor.from_pretrained(TinyMLP(), str(tmp_path))
    assert not is_loading_adapter()


# ------------------------------------------------------------------------------------------------ stale caches
@pytest.mark.parametrize("method", ["tcurlora", "lorapt"])
def test_direct_submodule_calls_with_backward_in_between_and_data_edits(method):
    pm = get_peft_model(tiny_unetr(), UNETR_CONFIGS[method](init_weights=False))
    vit = pm.base_model.model.vit
    x = _x((1, 1, 32, 32, 32))
    params = [p for _, p in _trainable(pm)]
    (vit(x)[0] ** 2).mean().backward()
    first = [p.grad.clone() for p in params]
    (vit(x)[0] ** 2).mean().backward()  # second direct call after a backward: no stale graph, grads accumulate
    for a, p in zip(first, params):
        torch.testing.assert_close(p.grad, 2 * a)
    # an in-place edit through .data is seen by the next call, directly or through the model
    with torch.no_grad():
        before_direct, before_model = vit(x)[0].clone(), pm(x).clone()
        for p in params:
            p.data.mul_(1.5)
        after_direct, after_model = vit(x)[0], pm(x)
        pm.merge_adapter()
        merged = pm(x)
        pm.unmerge_adapter()
    assert not torch.allclose(after_direct, before_direct) and not torch.allclose(after_model, before_model)
    torch.testing.assert_close(merged, after_model, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_adding_an_adapter_while_another_is_merged_uses_the_unmerged_weights(method):
    cfg = UNETR_CONFIGS[method](init_weights=False, serial=False) if method == "hyps" else \
        UNETR_CONFIGS[method](init_weights=False)
    torch.manual_seed(0)
    reference = get_peft_model(tiny_unetr(), cfg, adapter_name="a")
    torch.manual_seed(1)
    reference.add_adapter("b", copy.deepcopy(cfg))
    torch.manual_seed(0)
    pm = get_peft_model(tiny_unetr(), cfg, adapter_name="a")
    pm.merge_adapter()
    torch.manual_seed(1)
    pm.add_adapter("b", copy.deepcopy(cfg))
    pm.unmerge_adapter()
    if method == "lorapt":
        # singular vectors have arbitrary signs, which a 1e-8 change of W may flip: compare the principal part
        # P0 = U0 * S0 * V0^T the adapter is built around (sign-free) instead of U0, V0 themselves
        from peft_tensor.algebra import t_product

        for g_ref, g in zip(reference.base_model.groups("b"), pm.base_model.groups("b")):
            p0_ref = t_product(g_ref.lorapt_U_init, -g_ref._minus_g0())
            torch.testing.assert_close(t_product(g.lorapt_U_init, -g._minus_g0()), p0_ref, rtol=1e-4, atol=1e-5)
        return
    x = _x((1, 1, 32, 32, 32))
    with torch.no_grad():
        reference.set_adapter("b")
        pm.set_adapter("b")
        torch.testing.assert_close(pm(x), reference(x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------- weighted adapters
@pytest.mark.parametrize("method", METHODS)
def test_add_weighted_adapter_is_the_exact_weighted_sum(method):
    kw = {"init_weights": False, **({"serial": False} if method == "hyps" else {})}
    torch.manual_seed(0)
    pm = get_peft_model(tiny_unetr(), UNETR_CONFIGS[method](**kw), adapter_name="a")
    torch.manual_seed(1)
    pm.add_adapter("b", UNETR_CONFIGS[method](**kw))
    pm.add_weighted_adapter(["a", "b"], [0.3, -0.7], "mix")
    checked = 0
    for module in pm.modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "merged_adapters"):
            try:
                da, db, dm = (module.get_delta_weight(n).float() for n in ("a", "b", "mix"))
            except KeyError:
                continue
            torch.testing.assert_close(dm, 0.3 * da - 0.7 * db, rtol=1e-4, atol=1e-6)
            checked += 1
    assert checked > 0
    mix = [p for n, p in pm.named_parameters() if ".mix" in n]
    assert mix and not any(p.requires_grad for p in mix), "a new adapter stays frozen until it is set active"
    pm.set_adapter("mix")
    assert all(p.requires_grad for p in mix)


def test_add_weighted_adapter_refuses_hyps_serial_branches():
    pm = get_peft_model(tiny_unetr(), UNETR_CONFIGS["hyps"](), adapter_name="a")
    pm.add_adapter("b", UNETR_CONFIGS["hyps"]())
    with pytest.raises(MergeError, match="serial branch"):
        pm.add_weighted_adapter(["a", "b"], [0.5, 0.5], "mix")
    assert "mix" not in pm.peft_config


# ------------------------------------------------------------------------------------ replication and compile
@pytest.mark.parametrize("method", ["tcurlora", "lorapt"])
def test_module_replication_as_in_data_parallel_is_refused_with_a_clear_error(method):
    pm = get_peft_model(TinyMLP(), TCURLoraConfig(r=3, target_modules=["lin1", "lin2", "lin3"])
                        if method == "tcurlora" else LoraPTConfig(r=3, target_modules=["lin1", "lin2", "lin3"]))
    replica = copy.copy(pm.base_model.model)  # what nn.parallel.replicate does: shared hooks, a new module object
    with pytest.raises(RuntimeError, match="DistributedDataParallel"):
        replica(torch.randn(2, 10))


def test_torch_compile_of_a_training_step_and_of_merged_inference():
    try:  # the platform check: inductor and its C++ toolchain on a trivial function, not on our code
        torch.compile(lambda t: t * 2)(torch.ones(2))
    except Exception as exc:  # pragma: no cover - platform without a working inductor toolchain
        pytest.skip(f"torch.compile unavailable here: {type(exc).__name__}: {exc}")
    pm = get_peft_model(TinyMLP(), TCURLoraConfig(r=3, target_modules=["lin1", "lin2", "lin3"], init_weights=False))
    x = torch.randn(8, 10)
    eager = copy.deepcopy(pm)
    y = torch.compile(pm)(x)
    torch.testing.assert_close(y, eager(x), rtol=1e-5, atol=1e-6)
    (y ** 2).mean().backward()
    (eager(x) ** 2).mean().backward()
    for (n, p), (_, q) in zip(_trainable(pm), _trainable(eager)):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)
    merged = pm.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(merged)(x), eager(x), rtol=1e-4, atol=1e-5)


def test_failed_from_pretrained_leaves_no_hook_on_the_base_model(tmp_path, monkeypatch):
    import peft_tensor
    from peft_tensor.errors import AdapterLoadError

    pm = get_peft_model(TinyMLP(), TCURLoraConfig(r=3, target_modules=["lin1", "lin2", "lin3"], init_weights=False))
    pm.save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")  # a cut-off download
    base = TinyMLP()
    pre, post = dict(base._forward_pre_hooks), dict(base._forward_hooks)
    with pytest.raises(AdapterLoadError):
        peft_tensor.from_pretrained(base, tmp_path)
    assert dict(base._forward_pre_hooks) == pre and dict(base._forward_hooks) == post
    # and a failure inside PEFT's own load (after the injection) is rolled back too
    pm.save_pretrained(tmp_path)

    def broken_load(self, *args, **kwargs):
        raise RuntimeError("simulated failure while loading the state dict")

    monkeypatch.setattr(PeftModel, "load_adapter", broken_load)
    with pytest.raises(AdapterLoadError, match="simulated"):
        peft_tensor.from_pretrained(base, tmp_path)
    assert dict(base._forward_pre_hooks) == pre and dict(base._forward_hooks) == post
    assert not any("tcurlora" in type(m).__name__.lower() for m in base.modules())


@pytest.mark.parametrize("method", ["tcurlora", "lorapt"])
def test_delta_modes_compute_the_same_function_and_gradients(method):
    """delta_mode='dense' (x (W + D)^T, D through the FFT) equals the default factored path, identity bit-exact."""
    x = _x((1, 1, 32, 32, 32))
    results = {}
    for mode in ("factored", "dense"):
        torch.manual_seed(0)
        pm = get_peft_model(tiny_unetr(), UNETR_CONFIGS[method](init_weights=False, delta_mode=mode))
        y = pm(x)
        (y ** 2).mean().backward()
        results[mode] = (y.detach(), [p.grad for _, p in _trainable(pm)])
        identity = get_peft_model(tiny_unetr(), UNETR_CONFIGS[method](delta_mode=mode))
        with torch.no_grad():
            adapted = identity(x)
            with identity.disable_adapter():
                assert torch.equal(adapted, identity(x))
    torch.testing.assert_close(results["dense"][0], results["factored"][0], rtol=1e-4, atol=1e-5)
    # float32: dense adds D (about 1e-3 of W) to W before the product, so D keeps ~4 fewer digits than in the
    # factored path; the gradients agree to ~6e-4 of their largest entry here (exact in float64:
    # tests/tuners/test_dense_linear.py gradchecks the dense linear)
    for g_dense, g_factored in zip(results["dense"][1], results["factored"][1]):
        torch.testing.assert_close(g_dense, g_factored, rtol=1e-3, atol=2e-3 * g_factored.abs().max().item())


@pytest.mark.parametrize("grad", [True, False])
def test_dense_delta_mode_on_a_one_slice_group(grad):
    """A group of one layer (L = 1) in delta_mode='dense', with and without autograd, equals the factored path."""
    x = torch.randn(4, 10)
    outs = {}
    for mode in ("factored", "dense"):
        torch.manual_seed(0)
        pm = get_peft_model(TinyMLP(), TCURLoraConfig(r=3, target_modules=["lin0"], init_weights=False,
                                                      delta_mode=mode))
        assert [g.n_slices for g in pm.base_model.groups("default")] == [1]
        with torch.set_grad_enabled(grad):
            outs[mode] = pm(x).detach()
    torch.testing.assert_close(outs["dense"], outs["factored"], rtol=1e-5, atol=1e-6)
