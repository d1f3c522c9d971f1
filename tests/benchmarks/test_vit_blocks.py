"""Smoke test of the ViT-blocks micro-benchmark (benchmarks/vit_blocks.py): 2 tiny blocks (hidden 96), 32 tokens,
one step, floor + PEFT LoRA + tCURLoRA (paper grouping); checks the JSON / markdown structure and that the ratios
are taken against the floor's and LoRA's own numbers of the same cell (no speed is asserted)."""

from __future__ import annotations

import json

import pytest

from peft_tensor.training.config import load_config


def test_benchmark_vit_blocks_smoke(tmp_path, capsys):
    from benchmarks import vit_blocks as bench

    out = tmp_path / "out"
    result = bench.main(["--config", "vit_blocks_cpu", f"output_dir={out}", "stem=smoke", "run.threads=1",
                         "run.cells=[[32,1]]", "run.steps=1", "run.warmup_steps=0", "run.delta_modes=[]",
                         "model.hidden_size=96", "model.mlp_dim=192", "model.num_heads=4", "model.num_layers=2",
                         "model.img_size=32", "arms.tcurlora_by_shape=null", "arms.lorapt_paper=null",
                         "arms.lorapt_by_shape=null", "arms.lorapt_paper_p0=null", "run.memory_probe=false"])
    assert "| arm | step ms (wall) | CPU ms |" in capsys.readouterr().out

    data = json.loads((out / "smoke.json").read_text())
    assert data == json.loads(json.dumps(result, default=str))
    assert set(data) >= {"benchmark", "config", "machine", "versions", "device", "arms", "cells", "base_params",
                         "floor_arm", "reference_arm", "delta_mode_available"}
    assert list(data["arms"]) == ["floor", "lora", "tcurlora_paper"]
    assert data["arms"]["floor"]["trainable"] == 0
    assert data["arms"]["lora"]["trainable"] == 2 * 8 * ((96 + 288) + (96 + 96) + (96 + 192) + (192 + 96))
    assert data["arms"]["tcurlora_paper"]["trainable"] > 0
    [cell] = data["cells"]
    assert (cell["tokens"], cell["batch"], cell["steps"], cell["input"]) == (32, 1, 1, [1, 32, 96])
    arms = cell["arms"]
    floor, lora, tcur = arms["floor"], arms["lora"], arms["tcurlora_paper"]
    for a in arms.values():
        assert len(a["wall_samples_ms"]) == 1 and a["step_ms"] > 0 and a["cpu_ms"] > 0
        assert 0 < a["saved_act_mb"] <= a["saved_total_mb"]
        assert a["memory_proxy_mb"] == pytest.approx(a["saved_act_mb"] + a["adapter_state_mb"] + a["adapter_cache_mb"])
        assert a["vs_lora"]["memory_proxy"] == pytest.approx(a["memory_proxy_mb"] / lora["memory_proxy_mb"])
        assert "peak_above_mb" not in a  # memory_probe=false
        # ratios against the floor's and LoRA's own numbers of this cell
        assert a["vs_floor"]["step"] == pytest.approx(a["step_ms"] / floor["step_ms"])
        assert a["vs_floor"]["step_cpu"] == pytest.approx(a["cpu_ms"] / floor["cpu_ms"])
        assert a["vs_lora"]["step"] == pytest.approx(a["step_ms"] / lora["step_ms"])
        assert a["vs_lora"]["step_cpu"] == pytest.approx(a["cpu_ms"] / lora["cpu_ms"])
        assert a["vs_lora"]["saved_act"] == pytest.approx(a["saved_act_mb"] / lora["saved_act_mb"])
    assert lora["vs_lora"]["step"] == 1.0 and floor["vs_floor"]["step"] == 1.0
    assert floor["saved_act_mb"] < lora["saved_act_mb"]  # LoRA saves its adapters' inputs and low-rank outputs
    assert floor["adapter_state_mb"] == 0
    # LoRA r=8's A and B in float32; tCURLoRA: its cores and their initial values, the indices and the frozen C and R
    assert lora["adapter_state_mb"] * bench.MB == pytest.approx(4 * data["arms"]["lora"]["trainable"])
    assert tcur["adapter_state_mb"] * bench.MB > 8 * data["arms"]["tcurlora_paper"]["trainable"]

    text = (out / "smoke.md").read_text()
    assert text == bench.markdown_report(data)
    assert "## 32 tokens, batch 1 (input 1x32x96)" in text
    row = [line for line in text.splitlines() if line.startswith("| tCURLoRA r=8 (paper) |")][-1]  # cell table
    assert f"{tcur['vs_lora']['step']:.2f} / {tcur['vs_lora']['step_cpu']:.2f}" in row
    assert f"{tcur['vs_floor']['step']:.2f} / {tcur['vs_floor']['step_cpu']:.2f}" in row
    assert "| PEFT LoRA r=8 (ref) |" in text and "| floor (frozen, backprop to the input) (floor) |" in text


def test_expand_arms_delta_mode_only_where_the_config_has_it():
    from benchmarks import vit_blocks as bench

    cfg = load_config("vit_blocks_cpu", search=[bench.CONFIG_DIR])
    arms = bench.expand_arms(cfg["arms"], ["factored", "dense"])
    for name in ("tcurlora_paper", "lorapt_paper"):
        method = cfg["arms"][name]["name"]
        assert (f"{name}_dense" in arms) == bench._has_delta_mode(method)
    assert "lora_dense" not in arms and "floor_factored" not in arms
    assert list(bench.expand_arms(cfg["arms"], [])) == list(cfg["arms"])


def test_memory_probe_runs_one_arm_in_a_fresh_process_and_counts_a_dense_d():
    """The CPU memory probe (a fresh process per arm, peak-RSS mark reset before one step): a dense-mode arm's step
    peak includes its D per group (here 3 x 4 + 2 x 2 slices of 96 x 96 / 96 x 192 / 192 x 96 floats)."""
    from benchmarks import vit_blocks as bench

    if not bench.Path("/proc/self/clear_refs").exists():
        pytest.skip("the probe needs Linux /proc/self/clear_refs")
    cfg = load_config("vit_blocks_cpu", ["model.hidden_size=96", "model.mlp_dim=192", "model.num_heads=4",
                                         "model.num_layers=2", "model.img_size=32", "run.delta_modes=[dense]"],
                      search=[bench.CONFIG_DIR])
    out = bench._run_probe(cfg, "tcurlora_paper_dense", 64, 1, timeout=600)
    assert set(out) == {"peak_above_mb", "rss_before_mb", "peak_rss_mb"}
    d_mb = 2 * (4 * 96 * 96 + 2 * 96 * 192) * 4 / bench.MB  # the 2 blocks' D: attention (L=8) + MLP up/down (L=2)
    assert out["peak_above_mb"] >= d_mb
    assert out["peak_rss_mb"] == pytest.approx(out["rss_before_mb"] + out["peak_above_mb"])
