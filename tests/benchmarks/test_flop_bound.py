"""benchmarks/flop_bound.py counts the matmul work of each way to apply the tensor adapters. Its counts for the
schemes that run (floor, factored tCURLoRA and LoRA-PT, LoRA-PT with frozen_term='dense', delta_mode='dense') must
be the multiply-adds the code actually executes: counted here with torch's FlopCounterMode on small MONAI blocks
(paper grouping; the factored schemes also by shape), per token (the difference between two token counts removes
what is built once per step)."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import flop_bound
from peft_tensor import LoraPTConfig, TCURLoraConfig

HIDDEN, MLP, BLOCKS, HEADS, R = 32, 48, 3, 4, 2
DIMS = (HIDDEN, MLP, BLOCKS)
TARGETS = ["attn.qkv", "attn.out_proj", "mlp.linear1", "mlp.linear2"]


def _blocks():
    from monai.networks.blocks import TransformerBlock

    torch.manual_seed(0)
    seq = torch.nn.Sequential(*[TransformerBlock(HIDDEN, MLP, HEADS, 0.0, qkv_bias=False) for _ in range(BLOCKS)])
    model = torch.nn.Module()
    model.blocks = seq
    model.forward = lambda x: seq(x)
    return model


def _macs(model, tokens: int) -> float:
    x = torch.randn(1, tokens, HIDDEN, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        model(x).pow(2).mean().backward()
    return counter.get_total_flops() / 2


def _per_token(model, t1: int = 16, t2: int = 48) -> float:
    _macs(model, t1)  # warm-up: what a group builds once and keeps (LoRA-PT's frozen S0 V0^T) is not per token
    return (_macs(model, t2) - _macs(model, t1)) / (t2 - t1)


@pytest.fixture(scope="module")
def floor():
    model = _blocks().requires_grad_(False)
    return model, _macs(model, 16), _macs(model, 48)


def test_floor_count_is_what_the_frozen_blocks_execute(floor):
    _, m16, m48 = floor
    assert m16 == flop_bound.floor_macs(16, DIMS) * 16 * BLOCKS
    assert m48 == flop_bound.floor_macs(48, DIMS) * 48 * BLOCKS


@pytest.mark.parametrize("method, mode, grouping, config", [
    ("tcurlora", "factored", "paper", lambda: TCURLoraConfig(r=R, target_modules=TARGETS, grouping="paper")),
    ("lorapt", "factored", "paper", lambda: LoraPTConfig(r=R, target_modules=TARGETS, grouping="paper")),
    ("lorapt_frozen_dense", "factored", "paper",
     lambda: LoraPTConfig(r=R, target_modules=TARGETS, grouping="paper", frozen_term="dense")),
    ("tcurlora", "dense", "paper",
     lambda: TCURLoraConfig(r=R, target_modules=TARGETS, grouping="paper", delta_mode="dense")),
    ("tcurlora", "factored", "by_shape", lambda: TCURLoraConfig(r=R, target_modules=TARGETS, grouping="by_shape")),
    ("lorapt", "factored", "by_shape", lambda: LoraPTConfig(r=R, target_modules=TARGETS, grouping="by_shape")),
])
def test_adapter_count_is_what_the_code_executes(floor, method, mode, grouping, config):
    base, m16, m48 = floor
    model = get_peft_model(_blocks(), config())
    floor_per_token = (m48 - m16) / 32
    got = _per_token(model) - floor_per_token
    assert got == flop_bound.adapter_macs(method, mode, r=R, dims=DIMS, grouping=grouping) * BLOCKS


def test_work_table_counts_each_grouping_and_rank():
    text = flop_bound.work_table(ranks=(8, 16), tokens=64)
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith(("| tCURLoRA", "| LoRA-PT"))]
    assert len(rows) == 2 * 2 * 2  # methods x groupings x ranks
    work = {(row[0][2:], row[1], int(row[2])): float(row[4]) for row in rows}
    floor = flop_bound.floor_macs(64) * 64 * flop_bound.BLOCKS
    assert work[("tCURLoRA", "paper", 16)] == round(
        flop_bound.adapter_macs("tcurlora", "factored", r=16, grouping="paper") * 64 * flop_bound.BLOCKS / 1e9, 2)
    assert abs(work[("tCURLoRA", "paper", 16)] / work[("tCURLoRA", "paper", 8)] - 2) < 0.01  # linear in r
    assert work[("tCURLoRA", "by_shape", 16)] < work[("tCURLoRA", "paper", 16)]  # 12 slices per group, not 48
    assert f"{floor / 1e9:.2f} GMAC" in text
    assert "Command: `python benchmarks/flop_bound.py --work --ranks 8,16 --tokens 64`" in text
    with pytest.raises(ValueError, match="grouping"):
        flop_bound.layers(grouping="by_layer")


def test_report_lists_every_scheme_against_the_measured_arms():
    results = {"cells": [{"tokens": 512, "batch": 1, "arms": {
        "floor": {"cpu_ms": 3000.0}, "lora": {"cpu_ms": 3300.0}, "tcurlora_paper": {"cpu_ms": 4000.0}}}]}
    text = flop_bound.report(results, build=False)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "GMAC" not in line]
    assert len(rows) == len(flop_bound.SCHEMES)
    assert "| tCURLoRA | factored |" in text and f"| {4000 / 3300:.2f} |" in text  # the measured ratio
    assert text.count("not run") == len(flop_bound.SCHEMES) - 1
