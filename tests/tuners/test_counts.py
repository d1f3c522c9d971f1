"""Exact trainable-parameter counts on full-size UNETR-B (in 1, out 2, img 128, hidden 768, mlp 3072, 12 heads,
feature 16), the papers' oracles (see shared notes methods.md)."""

import pytest
from peft import LoraConfig, get_peft_model

from peft_tensor import LoraPTConfig, TCURLoraConfig
from tests._models import UNETR_DECODER, UNETR_TARGETS, full_unetr

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def unetr():
    return full_unetr()


def _count(unetr, config):
    pm = get_peft_model(unetr, config)
    try:
        return pm.get_nb_trainable_parameters()[0], pm.base_model.describe_groups() if hasattr(
            pm.base_model, "describe_groups") else None
    finally:
        pm.unload()


def test_tcurlora_r8_paper(unetr):
    n, groups = _count(unetr, TCURLoraConfig(r=8, target_modules=UNETR_TARGETS, grouping="paper"))
    assert n == 4_608
    assert [g["shape"] for g in groups] == [[48, 768, 768], [12, 3072, 768], [12, 768, 3072]]
    n, _ = _count(unetr, TCURLoraConfig(r=8, target_modules=UNETR_TARGETS, grouping="paper",
                                        modules_to_save=UNETR_DECODER))
    assert n == 2_683_136  # the paper's "2.683 M" with the decoder trainable


def test_tcurlora_by_shape_groups(unetr):
    _, groups = _count(unetr, TCURLoraConfig(r=8, target_modules=UNETR_TARGETS, grouping="by_shape"))
    expected = [[12, 2304, 768], [12, 768, 768], [12, 3072, 768], [12, 768, 3072]]
    assert sorted(g["shape"] for g in groups) == sorted(expected)


@pytest.mark.parametrize("r, expected", [(1, 165_960), (8, 1_331_712)])
def test_lorapt_paper(unetr, r, expected):
    n, _ = _count(unetr, LoraPTConfig(r=r, target_modules=UNETR_TARGETS, grouping="paper"))
    assert n == expected == 48 * (1536 * r + r * r) + 24 * (3840 * r + r * r)


def test_peft_lora_reference(unetr):
    assert _count(unetr, LoraConfig(r=8, target_modules=UNETR_TARGETS))[0] == 1_179_648


# ------------------------------------------------------------------------------ whole-network adapters (issue 12)
# UNETR-B's decoder (feature size 16): per block decoder5..decoder2 a ConvTranspose3d 2x2x2 (in -> out), conv1 3x3x3
# (2 out -> out), conv2 3x3x3 (out -> out) and conv3 1x1x1 (2 out -> out); the head 1x1x1 16 -> 2 with bias.
_DECODER = [(768, 128), (128, 64), (64, 32), (32, 16)]  # (transposed-conv in, block out)
_HEAD = 16 * 2 + 2


def _full_arm(arm: dict):
    from peft_tensor.training import apply_arm, param_counts
    from peft_tensor.training.models import build_model

    cfg = {"name": "unetr", "img_size": 64}  # UNETR-B; no trainable count depends on img_size
    model = apply_arm(build_model(cfg), arm, cfg)
    return model, param_counts(model)["trainable"]


def test_tcurlora_full_unetr_b_is_tens_of_thousands_and_its_file_well_under_1_mb(tmp_path):
    r = 8
    # slices: 4 by-shape groups of 12 Linears; per decoder block 8 + 27 + 27 kernel positions and one 1x1x1 slice
    slices = 4 * 12 + len(_DECODER) * (8 + 27 + 27 + 1)
    expected = r * r * slices + _HEAD
    model, n = _full_arm({"name": "tcurlora_full"})
    assert n == expected == 19_234
    model.save_pretrained(tmp_path)
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    # U and U0 in float32 (2 r^2 L); per group column/row indices, the group shape and the 64-byte base fingerprint
    # (int64) with their JSON header entries; the head
    assert 2 * 4 * r * r * slices < size < 2 * 4 * r * r * slices + 32_768 < 1_000_000
    print(f"\ntcurlora_full UNETR-B: {n:,} trainable ({r}^2 x {slices} slices + head {_HEAD}), file {size:,} bytes")


def test_lorapt_full_and_lora_full_unetr_b_counts():
    from peft import get_peft_model

    from peft_tensor.training.arms import peft_config

    cfg = {"name": "unetr", "img_size": 64}
    r = 2
    # LoRA-PT, by-shape Linear groups (L = 12 each) and one kernel group per convolution: L (r (n1 + n2) + r^2)
    linear = 12 * sum(r * (n1 + n2) + r * r for n1, n2 in ((2304, 768), (768, 768), (3072, 768), (768, 3072)))
    convs = 0
    for t_in, out in _DECODER:
        convs += 8 * (r * (t_in + out) + r * r)  # ConvTranspose3d, slices in x out
        convs += 27 * (r * (out + 2 * out) + r * r) + 27 * (r * (out + out) + r * r) + (r * (out + 2 * out) + r * r)
    from peft_tensor.training.models import build_model

    # no decomposition needed for a count: groups built empty on the meta device
    config = peft_config("lorapt_full", {"name": "lorapt_full", "r": r}, cfg)
    pm = get_peft_model(build_model(cfg), config, low_cpu_mem_usage=True)
    n = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert n == linear + convs + _HEAD
    # PEFT LoRA r=1 on the Linears (r (in + out)) and the decoder's Conv3d (r (in k^3 + out)); no ConvTranspose3d
    lora = 12 * sum(n1 + n2 for n1, n2 in ((2304, 768), (768, 768), (3072, 768), (768, 3072)))
    lora += sum((2 * out * 27 + out) + (out * 27 + out) + (2 * out + out) for _, out in _DECODER)
    _, n_lora = _full_arm({"name": "lora_full"})
    assert n_lora == lora + _HEAD
    print(f"\nlorapt_full (r={r}) UNETR-B: {n:,} trainable; lora_full (r=1): {n_lora:,}")
