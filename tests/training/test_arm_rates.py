"""Fair comparisons: PEFT LoRA and PiSSA train their adapters at their swept registry rate, as our methods do, and
the recipes' tables say which rate every arm trained at."""

from __future__ import annotations

import pytest
import torch

from peft_tensor.registry import BASELINE_LR, DECODER_RATE_FACTOR, get_method
from peft_tensor.training import load_config
from tests._recipe_fixtures import TINY_MODEL, pairs_dataset


def _cfg(data, out, arm: dict) -> dict:
    cfg = load_config("finetune_cpu")
    cfg.update({"output_dir": str(out), "progress": False, "device": "cpu", "threads": 1})
    cfg["data"] = {"kind": "pairs", "root": str(data), "foreground": [17, 53]}
    cfg["model"] = dict(TINY_MODEL)
    cfg["arm"] = arm
    cfg["train"].update({"steps": 1, "batch_size": 2, "checkpoint_every": 0, "val_every": 0})
    cfg["eval"] = {"overlap": 0.0}
    return cfg


@pytest.fixture
def optimizers(monkeypatch):
    """Every optimiser the recipes' training loop builds, with the model it was built for."""
    from peft_tensor.training import loop

    made = []
    build = loop.make_optimizer

    def spy(model, cfg):
        opt = build(model, cfg)
        made.append((model, opt))
        return opt

    monkeypatch.setattr(loop, "make_optimizer", spy)
    return made


def _group_rates(model, opt) -> dict:
    """{"adapter": {rates of the groups holding lora_A / lora_B}, "rest": {rates of the groups holding the rest}}"""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {"adapter": set(), "rest": set()}
    for group in opt.param_groups:
        for p in group["params"]:
            kind = "adapter" if ("lora_A" in names[id(p)] or "lora_B" in names[id(p)]) else "rest"
            out[kind].add(group["initial_lr"])  # the poly schedule has already stepped group["lr"]
    return out


def test_the_finetune_recipe_trains_peft_lora_and_pissa_at_their_registry_rate(tmp_path, optimizers, keep_threads):
    from peft_tensor.recipes import demo, finetune

    data = pairs_dataset(tmp_path / "data", n=4)
    results = {}
    # LoRA alone (its swept rate), PiSSA with the decoder (a tenth of its swept rate), an arm's own rate, frozen
    for name, arm in (("lora", {"name": "lora", "r": 2, "decoder": "head"}), ("pissa", {"name": "pissa", "r": 2}),
                      ("lora_own_rate", {"name": "lora", "r": 2, "method_lr": 0.02}), ("frozen", {"name": "frozen"})):
        results[name] = finetune.main(_cfg(data, tmp_path / name, arm))
    decoder_lr = load_config("finetune_cpu")["optim"]["lr"]
    pissa_rate = float(f"{BASELINE_LR['pissa'] * DECODER_RATE_FACTOR:.12g}")  # 0.03, as the recipes round it
    assert BASELINE_LR["lora"] != decoder_lr and pissa_rate != decoder_lr  # else nothing is tested
    want = {"lora": BASELINE_LR["lora"], "pissa": pissa_rate, "lora_own_rate": 0.02}
    for (model, opt), (name, rate) in zip(optimizers, want.items()):
        rates = _group_rates(model, opt)
        assert rates["rest"] == {decoder_lr} and rates["adapter"] == {rate}, name
        assert results[name]["rates"] == {"lr": decoder_lr, "method_lr": rate}
    model, opt = optimizers[-1]  # frozen: the head alone, one rate
    assert [g["initial_lr"] for g in opt.param_groups] == [decoder_lr]
    assert results["frozen"]["rates"] == {"lr": decoder_lr, "method_lr": None}

    # the tables say it: the demo's results table, and the model card of the run
    table = demo.format_table(results)
    assert "| lr (adapter / rest) |" in table.splitlines()[0]
    rows = {line.split("|")[1].strip(): line.split("|")[3].strip() for line in table.splitlines()[2:]}
    assert rows == {"lora": f"{BASELINE_LR['lora']:g} / {decoder_lr:g}",
                    "pissa": f"{pissa_rate:g} / {decoder_lr:g}", "lora_own_rate": f"0.02 / {decoder_lr:g}",
                    "frozen": f"{decoder_lr:g}"}
    card = (tmp_path / "lora" / "adapter" / "README.md").read_text()
    assert f"lr {BASELINE_LR['lora']:g} / {decoder_lr:g} (adapter / decoder and head)" in card


def test_every_peft_arm_but_lora_full_has_a_swept_adapter_rate():
    from peft_tensor.training.arms import PEFT_ARMS, arm_rates, format_rates

    optim = {"lr": 3e-3}
    for arm in PEFT_ARMS:
        rates = arm_rates(arm, optim)
        if arm == "lora_full":  # not swept: its adapters train at optim.lr with the head
            assert rates == {"lr": 3e-3, "method_lr": None}
            continue
        method = arm.removesuffix("_full")
        swept = BASELINE_LR.get(method) or (get_method(method).full_lr if arm.endswith("_full") else None) \
            or get_method(method).lr
        if arm.endswith("_full"):  # the whole-network arm's own rate
            assert rates == {"lr": 3e-3, "method_lr": swept}, arm
            continue
        # the swept rate is the adapter's alone; with the decoder training too, a tenth of it
        assert arm_rates({"name": arm, "decoder": "head"}, optim) == {"lr": 3e-3, "method_lr": swept}, arm
        assert rates == {"lr": 3e-3, "method_lr": pytest.approx(swept * DECODER_RATE_FACTOR, rel=1e-12)}, arm
        assert arm_rates({"name": arm, "decoder": "wide"}, optim) == rates, arm
    assert arm_rates({"name": "lora", "lr": 1e-3, "decoder": "head"}, optim) == {"lr": 1e-3,
                                                                               "method_lr": BASELINE_LR["lora"]}
    assert arm_rates({"name": "lora", "method_lr": 0.05}, optim)["method_lr"] == 0.05  # an arm's own rate wins
    assert format_rates({"lr": 3e-3, "method_lr": 0.3}) == "0.3 / 0.003"
    assert format_rates({"lr": 3e-3, "method_lr": None}) == "0.003" and format_rates(None) == "?"


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
