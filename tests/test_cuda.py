"""CUDA paths (issue 9, section 4): every method on a CUDA UNETR/SwinUNETR; skipped where no GPU is present.

Run on a GPU machine with ``benchmarks/gpu_check.sh`` (CUDA tests, PEFT's suite on CUDA and the GPU benchmark).
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_tensor import HyPSConfig, LoraPTConfig, TCURLoraConfig
from peft_tensor.errors import TargetModulesError
from tests._models import SWIN_TARGETS, UNETR_TARGETS, tiny_unetr

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.fixture(autouse=True)
def no_tf32():
    """Exactness checks in true float32: cuDNN's default TF32 convolutions round the decoder's inputs to 10 mantissa
    bits, which turns 1e-7 differences upstream (merged vs unmerged weights) into 1e-3 differences at the output."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved

CONFIGS = {
    "tcurlora": lambda **kw: TCURLoraConfig(r=4, target_modules=UNETR_TARGETS, grouping="paper", **kw),
    "lorapt": lambda **kw: LoraPTConfig(r=2, target_modules=UNETR_TARGETS, grouping="paper", **kw),
    "hyps": lambda **kw: HyPSConfig(r=2, d=4, target_modules=UNETR_TARGETS, serial=False, **kw),
}


def _x(device="cuda", batch=1):
    return torch.randn(batch, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1)).to(device)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_cuda_lifecycle_and_saved_on_cuda_loads_on_cpu_and_back(method, tmp_path):
    pm = get_peft_model(tiny_unetr().cuda(), CONFIGS[method](init_weights=False))
    with torch.no_grad(), pm.disable_adapter():
        base = pm(_x())
    pm.train()
    y = pm(_x())
    (y ** 2).mean().backward()
    trainable = [(n, p) for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all(p.device.type == "cuda" for _, p in trainable)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in trainable), "every factor gets a gradient"
    for _, buf in pm.named_buffers():
        assert buf.device.type == "cuda", "buffers and index tensors live on the module's device"
    pm.eval()
    with torch.no_grad():
        out = pm(_x())
        assert not torch.allclose(out, base)
        pm.merge_adapter()
        torch.testing.assert_close(pm(_x()), out, rtol=1e-3, atol=1e-4)
        pm.unmerge_adapter()
    pm.save_pretrained(tmp_path)
    on_cpu = PeftModel.from_pretrained(tiny_unetr(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(on_cpu(_x("cpu")), out.cpu(), rtol=1e-3, atol=1e-4)
        back = on_cpu.cuda()
        torch.testing.assert_close(back(_x()), out, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_cuda_mixed_batch_and_bf16_autocast(method):
    torch.manual_seed(0)
    pm = get_peft_model(tiny_unetr().cuda(), CONFIGS[method](init_weights=False), adapter_name="a")
    pm.add_adapter("b", CONFIGS[method](init_weights=False))
    pm.eval()
    x = _x(batch=2)
    with torch.no_grad():
        ya = pm(x)
        mixed = pm(x, adapter_names=["a", "__base__"])
        with pm.disable_adapter():
            base = pm(x)
    torch.testing.assert_close(mixed[0], ya[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mixed[1], base[1], rtol=1e-4, atol=1e-5)
    pm.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = pm(x)
    (y.float() ** 2).mean().backward()
    assert all(p.grad is not None for n, p in pm.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("method", ["tcurlora", "lorapt"])
def test_cuda_low_cpu_mem_usage_load_onto_a_cuda_model(method, tmp_path):
    pm = get_peft_model(tiny_unetr().cuda(), CONFIGS[method](init_weights=False))
    with torch.no_grad():
        expected = pm(_x())
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_unetr().cuda(), tmp_path, low_cpu_mem_usage=True)
    assert all(p.device.type == "cuda" for p in loaded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(_x()), expected, rtol=1e-4, atol=1e-5)


def test_cuda_swinunetr_checkpointing_hyps_and_tcurlora():
    from monai.networks.nets import SwinUNETR

    for config in (HyPSConfig(r=2, d=4, target_modules=SWIN_TARGETS, init_weights=False),
                   TCURLoraConfig(r=2, target_modules=SWIN_TARGETS, init_weights=False)):
        grads = []
        for use_checkpoint in (False, True):
            torch.manual_seed(0)
            net = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1), norm_name="batch",
                            use_checkpoint=use_checkpoint).cuda()
            pm = get_peft_model(net, config).eval()
            (pm(_x()) ** 2).mean().backward()
            grads.append({n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad})
        for name in grads[0]:
            torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-3, atol=1e-5)


def test_a_group_split_across_devices_is_refused_at_wrap_time():
    net = tiny_unetr()
    net.vit.blocks[0].cuda()  # as a device_map that shards the transformer would
    with pytest.raises(TargetModulesError, match="different devices"):
        get_peft_model(net, CONFIGS["tcurlora"]())
