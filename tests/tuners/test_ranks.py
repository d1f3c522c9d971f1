"""Per-layer ranks (issue 21, item 3): ``rank_pattern`` with PEFT LoRA's matching and ``rank_cap``, for tCURLoRA,
LoRA-PT and HyPS, on test-sized MONAI networks with their real module names: whole-network targets (every Linear and
every k>1 convolution, 1-channel input included) build, train, save, load and merge with non-uniform ranks."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

from peft_tensor import HyPSConfig, LoraPTConfig, TCURLoraConfig
from peft_tensor.errors import PeftTensorError, RankError
from peft_tensor.tuners._targets import is_conv
from tests._models import UNETR_TARGETS, TinyMLP, tiny_unetr
from tests._numerics import UNETR_DEPTH, assert_float32_close

TENSOR = {"tcurlora": TCURLoraConfig, "lorapt": LoraPTConfig}
CONFIGS = {**TENSOR, "hyps": HyPSConfig}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def whole_network(net: nn.Module) -> str:
    """Every nn.Linear and every convolution with a kernel larger than 1 (a full-match regex of their names)."""
    names = [n for n, m in net.named_modules()
             if isinstance(m, nn.Linear) or (is_conv(m) and m.weight.shape[2:].numel() > 1)]
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


def tiny_segresnet(seed: int = 0):
    from monai.networks.nets import SegResNet

    torch.manual_seed(seed)
    return SegResNet(spatial_dims=3, init_filters=8, in_channels=1, out_channels=2, blocks_down=(1, 1, 1),
                     blocks_up=(1, 1), norm="instance").eval()


def _x(shape=(1, 1, 32, 32, 32), seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _ranks(pm) -> dict[str, int]:
    return {g["name"]: g["rank"] for g in pm.base_model.describe_groups()}


def _build(net, config):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = get_peft_model(net, config)
    return pm, [str(w.message) for w in caught if "rank_cap" in str(w.message)]


# ------------------------------------------------------------------------------------------------- rank_pattern
@pytest.mark.parametrize("method", list(TENSOR))
def test_rank_pattern_sets_each_groups_rank_and_the_saved_shapes(method, tmp_path, request):
    config = TENSOR[method](r=4, target_modules=UNETR_TARGETS + ["decoder2.conv_block.conv2.conv"],
                            init_weights=False, rank_pattern={"mlp.linear1": 2, "^decoder2\\.conv_block\\..*": 3})
    pm, _ = _build(tiny_unetr(), config)
    ranks = _ranks(pm)
    assert ranks == {"shape_288x96": 4, "shape_96x96": 4, "shape_192x96": 2, "shape_96x192": 4,
                     "kernel_decoder2.conv_block.conv2.conv": 3}
    groups = {g.name: g for g in pm.base_model.groups("default")}
    first = next(iter(dict(groups["shape_192x96"].named_parameters()).values()))
    assert 2 in first.shape and 4 not in first.shape[1:]
    x = _x()
    with torch.no_grad():
        expected = pm(x)
    pm.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == {"mlp.linear1": 2, "^decoder2\\.conv_block\\..*": 3} and saved["rank_cap"] is False
    request.getfixturevalue("no_decomposition")
    for low_cpu_mem_usage in (False, True):
        loaded = PeftModel.from_pretrained(tiny_unetr(), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
        assert _ranks(loaded) == ranks
        with torch.no_grad():
            assert torch.equal(loaded(x), expected)


@pytest.mark.parametrize("method", list(TENSOR))
def test_members_of_a_group_must_resolve_to_one_rank(method):
    net = tiny_unetr()
    match = (r"stacks the 12 layers of group 'shape_288x96' into one tensor, which has one rank, but rank_pattern "
             r"gives them different ranks \(r=2 for vit.blocks.0.attn.qkv; r=4 for vit.blocks.1.attn.qkv, .* and 7 "
             r"more\): give all of them one rank, e.g. rank_pattern=\{'attn.qkv': 2\}")
    with pytest.raises(RankError, match=match):
        get_peft_model(net, TENSOR[method](r=4, target_modules=UNETR_TARGETS, rank_pattern={"blocks.0.attn.qkv": 2}))
    # the paper's attention tensor stacks q, k, v (one module) with out_proj (another): both need the rank
    with pytest.raises(RankError, match=r"group 'attention'.*r=2 for vit.blocks.0.attn.qkv.*"
                                        r"r=4 for vit.blocks.0.attn.out_proj.*\): give all of them one rank, e.g. "
                                        r"rank_pattern=\{'\(attn\\\\.out_proj\|attn\\\\.qkv\)': 2"):
        get_peft_model(net, TENSOR[method](r=4, target_modules=UNETR_TARGETS, grouping="paper",
                                           rank_pattern={"attn.qkv": 2}))
    assert not any(isinstance(m, nn.Module) and hasattr(m, "base_layer") for m in net.modules())
    pm = get_peft_model(net, TENSOR[method](r=4, target_modules=UNETR_TARGETS, grouping="paper",
                                            rank_pattern={"attn\\.(qkv|out_proj)": 2}))
    assert _ranks(pm) == {"attention": 2, "mlp_up": 4, "mlp_down": 4}


def test_hyps_rank_pattern_and_rank_cap_per_layer(tmp_path):
    config = HyPSConfig(r=4, target_modules=["lin0", "lin1", "lin2", "head"], rank_pattern={"lin1": 2},
                        rank_cap=True, init_weights=False)
    pm, warned = _build(TinyMLP(), config)
    model = pm.base_model.model
    assert {n: tuple(getattr(model, n).hyps_A["default"].shape) for n in ("lin0", "lin1", "lin2", "head")} == {
        "lin0": (16, 4), "lin1": (16, 2), "lin2": (16, 4), "head": (2, 2)}
    assert len(warned) == 1 and "'head' r=4 -> 2" in warned[0] and "lin" not in warned[0]
    x = torch.randn(3, 10)
    with torch.no_grad():
        expected = pm(x)
    pm.save_pretrained(tmp_path)
    for low_cpu_mem_usage in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a load re-resolves the caps silently
            loaded = PeftModel.from_pretrained(TinyMLP(), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
        assert loaded.base_model.model.head.hyps_A["default"].shape == (2, 2)
        with torch.no_grad():
            assert torch.equal(loaded(x), expected)
    with pytest.raises(RankError, match=r"HyPS r=4 exceeds min\(out, in\)=2 of the Linear 'head' \(2 x 16\)\. Pass "
                                        r"rank_pattern=\{'head': 2\} or rank_cap=True"):
        get_peft_model(TinyMLP(), HyPSConfig(r=4, target_modules=["lin1", "head"]))


# --------------------------------------------------------------------------------------- whole-network rank_cap
@pytest.mark.parametrize("method", list(TENSOR))
def test_whole_network_unetr_needs_rank_cap_and_builds_with_it(method, tmp_path, request):
    net = tiny_unetr()
    targets = whole_network(net)
    with pytest.raises(RankError, match=r"r=8 exceeds min\(n1, n2\)=1 of group "
                                        r"'kernel_vit.patch_embedding.patch_embeddings'.*Pass rank_pattern="
                                        r"\{'vit.patch_embedding.patch_embeddings': 1\} or rank_cap=True"):
        get_peft_model(net, TENSOR[method](r=8, target_modules=targets))
    pm, warned = _build(net, TENSOR[method](r=8, target_modules=targets, rank_cap=True, init_weights=False))
    assert len(warned) == 1
    assert ("2 groups: 'kernel_vit.patch_embedding.patch_embeddings' r=8 -> 1, 'kernel_encoder1.layer.conv1.conv' "
            "r=8 -> 1") in warned[0]
    ranks = _ranks(pm)
    assert ranks["kernel_encoder1.layer.conv1.conv"] == 1 and ranks["shape_288x96"] == 8
    assert set(ranks.values()) == {1, 8} and len(ranks) > 20
    x = _x()
    with torch.no_grad():
        expected = pm(x)
    pm.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["rank_cap"] is True
    request.getfixturevalue("no_decomposition")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = PeftModel.from_pretrained(tiny_unetr(), tmp_path, low_cpu_mem_usage=True)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_every_trainable_factor_gets_a_gradient_with_non_uniform_ranks(method):
    net = tiny_segresnet()
    config = CONFIGS[method](r=4, target_modules=whole_network(net), rank_cap=True, init_weights=False,
                             **({"rank_pattern": {"down_layers.1.1.conv1.conv": 2}} if method == "hyps" else {}))
    pm, warned = _build(net, config)
    if method != "hyps":
        assert "'kernel_convInit.conv' r=4 -> 1" in warned[0]
        assert set(_ranks(pm).values()) == {1, 4}
    else:
        assert pm.base_model.model.down_layers[1][1].conv1.conv.hyps_A["default"].shape[1] == 2
    pm.train()
    (pm(_x((1, 1, 16, 16, 16))) ** 2).mean().backward()
    params = [(n, p) for n, p in pm.named_parameters() if p.requires_grad]
    assert params
    missing = [n for n, p in params if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


# ------------------------------------------------------------------------------------------ merge and combination
@pytest.mark.parametrize("method", list(CONFIGS))
def test_merge_and_weighted_combination_with_non_uniform_ranks(method):
    pattern = {"mlp.linear1": 2, "decoder3.conv_block.conv2.conv": 1}
    extra = {"serial": False} if method == "hyps" else {}

    def config():
        return CONFIGS[method](r=3, target_modules=UNETR_TARGETS + ["decoder3.conv_block.conv2.conv"],
                               rank_pattern=pattern, init_weights=False, **extra)

    torch.manual_seed(0)
    pm = get_peft_model(tiny_unetr(), config())
    torch.manual_seed(1)
    pm.add_adapter("other", config())
    pm.base_model.add_weighted_adapter(["default", "other"], [0.5, 0.7], "both")
    tuner = pm.base_model
    if method == "hyps":
        layer = tuner.model.vit.blocks[0].mlp.linear1
        assert layer.hyps_r == {"default": 2, "other": 2, "both": 4}
        deltas = {a: layer.get_delta_weight(a) for a in ("default", "other", "both")}
        w = layer.get_base_layer().weight.detach()
        assert_float32_close(w + deltas["both"], w + 0.5 * deltas["default"] + 0.7 * deltas["other"], depth=4)
    else:
        both = {g.name: g for g in tuner.groups("both")}
        ranks = {name: g.rank for name, g in both.items()}
        expected_rank = {"lorapt": lambda k: 2 * k, "tcurlora": lambda k: k}[method]
        assert ranks["shape_192x96"] == expected_rank(2) and ranks["shape_288x96"] == expected_rank(3)
        for name, g in both.items():
            # compared as the adapted weights W + D: a LoRA-PT update P - P0 is a difference of weight-sized terms,
            # so it rounds at the weights' scale, not at its own
            a, b = ({h.name: h for h in tuner.groups(n)}[name].dense_delta() for n in ("default", "other"))
            w = g.stacked_weight()
            assert_float32_close(w + g.dense_delta(), w + 0.5 * a + 0.7 * b, depth=4, msg=name)
    pm.set_adapter("both")
    x = _x()
    with torch.no_grad():
        unmerged = pm(x)
        merged = pm.merge_and_unload()(x)
    assert_float32_close(merged, unmerged, depth=UNETR_DEPTH)


# ---------------------------------------------------------------------------------------------------- the config
@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("bad, match", [
    ({"rank_pattern": {"lin1": 0}}, r"rank_pattern\['lin1'\] must be a positive integer rank, got 0"),
    ({"rank_pattern": {"lin1": True}}, r"must be a positive integer rank"),
    ({"rank_pattern": {"lin(": 2}}, r"rank_pattern key 'lin\(' is not a valid regex .*escape it"),
    ({"rank_pattern": ["lin1"]}, r"rank_pattern must be a dict"),
    ({"rank_cap": "yes"}, r"rank_cap must be True, False or None, got 'yes'"),
])
def test_config_refuses_malformed_rank_settings(method, bad, match):
    with pytest.raises(PeftTensorError, match=match):
        CONFIGS[method](target_modules=["lin1"], **bad)

