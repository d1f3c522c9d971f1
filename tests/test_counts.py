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
