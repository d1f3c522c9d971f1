"""The arms' default decoder is the papers' (issue 13 section 3); the wider set and the adapter alone are options."""

import pytest

from peft_tensor.training import apply_arm, param_counts
from peft_tensor.training.arms import optimizer_settings
from peft_tensor.training.models import build_model


@pytest.fixture(scope="module")
def unetr_b_cfg():
    return {"name": "unetr", "img_size": 64}  # UNETR-B (hidden 768); the decoder count does not depend on img_size


def test_unetr_b_default_decoder_is_the_papers(unetr_b_cfg):
    counts = param_counts(apply_arm(build_model(unetr_b_cfg), "decoder_only", unetr_b_cfg))
    assert counts["trainable"] == 2_678_562  # decoder2-5 + head
    tcur = apply_arm(build_model(unetr_b_cfg), {"name": "tcurlora", "r": 8, "grouping": "paper"}, unetr_b_cfg)
    assert param_counts(tcur)["trainable"] == 2_683_170  # the paper's "2.683 M": 4,608 core + the decoder


def test_unetr_decoder_sets_wide_and_head(unetr_b_cfg):
    wide = param_counts(apply_arm(build_model(unetr_b_cfg), {"name": "decoder_only", "decoder": "wide"},
                                  unetr_b_cfg))["trainable"]
    assert wide > 2_678_562  # encoder1-4 on top
    alone = apply_arm(build_model(unetr_b_cfg), {"name": "tcurlora", "r": 8, "grouping": "paper", "decoder": "head"},
                      unetr_b_cfg)
    assert param_counts(alone)["trainable"] == 4_608 + 34  # the core and the 1x1x1 head (16 -> 2 channels)
    with pytest.raises(ValueError, match="decoder set"):
        apply_arm(build_model(unetr_b_cfg), {"name": "decoder_only", "decoder": "everything"}, unetr_b_cfg)


def test_swinunetr_default_decoder_is_hyps_papers():
    cfg = {"name": "swinunetr"}
    counts = param_counts(apply_arm(build_model(cfg), "decoder_only", cfg))
    assert counts["trainable"] == 19_597_922  # decoder1-5 + head (HyPS)


@pytest.mark.parametrize("method", ["tcurlora", "lorapt", "hyps"])
def test_every_method_has_a_registry_learning_rate(method):
    """Measured adapter-only sweep (benchmarks/results/lr_sweep_cpu.md): the recipes' 3e-3 leaves tCURLoRA and LoRA-PT
    at the frozen network's Dice; each method's factors train at its own rate, the decoder keeps optim.lr."""
    settings = optimizer_settings({"name": method})
    assert settings["method_lr"] > 3e-3


@pytest.mark.parametrize("method", ["tcurlora", "lorapt"])
def test_factor_weight_decay_is_the_registrys_or_the_arms(method):
    """Adam's coupled weight decay pulls each factor towards zero; LoRA-PT's zero removes the principal part,
    tCURLoRA's the weights' CUR part, and on a backbone with small gradients that pull outweighs the data
    (docs/methods.md#weight-decay): the recipes train their factors without it (registry), the decoder and head with
    optim.weight_decay; an arm may set its own."""
    from peft_tensor.training.loop import make_optimizer

    settings = optimizer_settings({"name": method, "method_weight_decay": 0.0})
    assert optimizer_settings({"name": "lorapt"})["method_weight_decay"] == 0.0
    assert optimizer_settings({"name": "tcurlora"})["method_weight_decay"] == 0.0
    assert "method_weight_decay" not in optimizer_settings({"name": "hyps"})  # optim.weight_decay
    assert optimizer_settings({"name": method, "method_weight_decay": 1e-4})["method_weight_decay"] == 1e-4
    cfg = {"name": "unetr", "img_size": 16, "feature_size": 8, "hidden_size": 32, "mlp_dim": 64, "num_heads": 4}
    model = apply_arm(build_model(cfg), {"name": method, "r": 2}, cfg)
    opt = make_optimizer(model, {"lr": 3e-3, "weight_decay": 2e-5, **settings})
    decoder, factors = opt.param_groups
    assert (decoder["lr"], decoder["weight_decay"]) == (3e-3, 2e-5)
    assert (factors["lr"], factors["weight_decay"]) == (settings["method_lr"], 0.0)
    # every group's factors: tCURLoRA's 3 cores on UNETR (the paper's grouping), LoRA-PT's U, S, V of 4 shape groups
    assert all(p.dim() > 0 for p in factors["params"])
    assert len(factors["params"]) == {"tcurlora": 3, "lorapt": 12}[method]


def test_full_arms_adapt_the_decoder_convolutions_and_train_only_the_head():
    """<method>_full: the method on the encoder Linears and every decoder2-5 convolution; the head trains in full."""
    from peft_tensor.training.arms import FULL_ARMS, decoder_conv_targets, peft_config

    cfg = {"name": "unetr", "img_size": 32, "feature_size": 8, "hidden_size": 96, "mlp_dim": 192, "num_heads": 4}
    assert {"tcurlora_full", "lorapt_full", "hyps_full", "lora_full"} <= set(FULL_ARMS)
    convs = decoder_conv_targets(cfg)
    assert len(convs) == 16 and all(c.startswith(("decoder2", "decoder3", "decoder4", "decoder5")) for c in convs)
    assert sum(c.endswith("transp_conv.conv") for c in convs) == 4
    config = peft_config("tcurlora_full", {"name": "tcurlora_full"}, cfg)
    assert set(config.target_modules) >= set(convs) and config.modules_to_save == ["out.conv.conv"]
    lora = peft_config("lora_full", {"name": "lora_full"}, cfg)  # PEFT LoRA has no ConvTranspose3d
    assert lora.r == 1 and not any(t.endswith("transp_conv.conv") for t in lora.target_modules)
    model = apply_arm(build_model(cfg), "tcurlora_full", cfg)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("modules_to_save" in n and "out.conv.conv" in n for n in names)
    assert not any("decoder" in n for n in names), "the decoder is adapted, not trained in full"
    # 8^2 x (4 by-shape Linear groups of 12 + per block 8 + 27 + 27 + 1 slices) + the 8 -> 2 head
    assert param_counts(model)["trainable"] == 64 * (48 + 4 * 63) + 18
    with pytest.raises(ValueError, match="decoder: head would leave none"):
        peft_config("tcurlora_full", {"name": "tcurlora_full", "decoder": "head"}, cfg)


def test_full_arms_on_swinunetr_and_target_configs():
    """hyps_full on SwinUNETR (its constructor .item()s a tensor, so the decoder is read from an empty-weights build,
    not the meta device); lorapt_full takes its own rank; a _target_ network config gets the same targets as the
    equivalent name: config."""
    from peft_tensor.training.arms import decoder_conv_targets, peft_config

    swin = {"name": "swinunetr", "feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]}
    convs = decoder_conv_targets(swin)
    assert convs and all(c.startswith(("decoder1", "decoder2", "decoder3", "decoder4", "decoder5")) for c in convs)
    hyps = peft_config("hyps_full", {"name": "hyps_full"}, swin)
    assert set(hyps.target_modules) >= set(convs) and "attn.qkv" in hyps.target_modules
    unetr = {"name": "unetr", "img_size": 32, "feature_size": 8, "hidden_size": 96, "mlp_dim": 192, "num_heads": 4}
    assert peft_config("lorapt_full", {"name": "lorapt_full"}, unetr).r == 2
    # the recipes' LoRA-PT arm: r=32, one scale per principal component, the core at a fifth of the factors' gain,
    # at 0.1; an arm asking for 'auto' gets 'auto''s 0.3; the paper's recipe and the whole-network arm keep the
    # core's gain at 1 and 'auto' (at 0.3)
    lorapt = peft_config("lorapt", {"name": "lorapt"}, unetr)
    assert (lorapt.r, lorapt.factor_scale, lorapt.core_gain) == (32, "per_component", 0.2)
    assert optimizer_settings({"name": "lorapt", "decoder": "head"})["method_lr"] == 0.1
    assert optimizer_settings({"name": "lorapt", "decoder": "head", "factor_scale": "auto"})["method_lr"] == 0.3
    full = peft_config("lorapt_full", {"name": "lorapt_full"}, unetr)
    assert (full.core_gain, full.factor_scale) == (1.0, "auto")
    assert optimizer_settings({"name": "lorapt_full"})["method_lr"] == 0.3
    assert peft_config("lorapt", {"name": "lorapt", "factor_scale": 1.0, "core_gain": 1.0}, unetr).core_gain == 1.0
    # the whole-network tCURLoRA arm has its own core learning rate (0.3 is unstable there); others fall back to lr
    assert optimizer_settings({"name": "tcurlora_full"})["method_lr"] == 0.03
    # the recipes' tCURLoRA arm: r=16, orthonormal core at 2.0 alone; an arm asking for the paper's core basis gets its
    # 0.3; with the decoder training too, a tenth of each
    assert optimizer_settings({"name": "tcurlora", "decoder": "head"})["method_lr"] == 2.0
    assert optimizer_settings({"name": "tcurlora", "basis": "paper", "decoder": "head"})["method_lr"] == 0.3
    assert optimizer_settings({"name": "tcurlora"})["method_lr"] == 0.2
    assert optimizer_settings({"name": "tcurlora", "basis": "paper"})["method_lr"] == 0.03
    assert optimizer_settings({"name": "lorapt"})["method_lr"] == 0.01
    assert optimizer_settings({"name": "lorapt", "factor_scale": "auto"})["method_lr"] == 0.03
    assert optimizer_settings({"name": "hyps", "decoder": "wide"})["method_lr"] == 0.01
    assert optimizer_settings({"name": "tcurlora", "basis": "paper", "method_lr": 0.1})["method_lr"] == 0.1
    recipe = peft_config("tcurlora", {"name": "tcurlora"}, unetr)
    assert (recipe.r, recipe.basis, recipe.grouping) == (16, "orthonormal", "paper")  # UNETR: the paper's grouping
    # the backbone's own default only with the preset's targets: not on SwinUNETR, not with the arm's own targets,
    # not for the whole-network arm; an arm's own grouping wins
    assert peft_config("tcurlora", {"name": "tcurlora"}, swin).grouping == "by_shape"
    own = peft_config("tcurlora", {"name": "tcurlora", "target_modules": ["attn.qkv"]}, unetr)
    assert (own.grouping, own.r) == ("by_shape", 16)
    assert peft_config("tcurlora_full", {"name": "tcurlora_full"}, unetr).grouping == "by_shape"
    assert peft_config("tcurlora", {"name": "tcurlora", "grouping": "by_shape"}, unetr).grouping == "by_shape"
    assert peft_config("lorapt", {"name": "lorapt"}, unetr).grouping == "by_shape"
    assert peft_config("tcurlora", {"name": "tcurlora", "basis": "paper"}, unetr).basis == "paper"
    assert (peft_config("tcurlora_full", {"name": "tcurlora_full"}, unetr).basis,
            optimizer_settings({"name": "tcurlora_full", "basis": "paper"})["method_lr"]) == ("paper", 0.03)
    assert optimizer_settings({"name": "hyps_full"}) == optimizer_settings({"name": "hyps", "decoder": "head"})
    assert optimizer_settings({"name": "tcurlora_full", "method_lr": 0.1})["method_lr"] == 0.1
    by_target = {"_target_": "monai.networks.nets.UNETR", "in_channels": 1, "out_channels": 2, "img_size": [32] * 3,
                 "feature_size": 8, "hidden_size": 96, "mlp_dim": 192, "num_heads": 4}
    def targets(config):  # None: the tuner takes the network's preset, the same for both
        return None if config.target_modules is None else sorted(config.target_modules)

    for arm in ("tcurlora", "hyps", "tcurlora_full"):
        assert targets(peft_config(arm, {"name": arm}, by_target)) == targets(peft_config(arm, {"name": arm}, unetr))
