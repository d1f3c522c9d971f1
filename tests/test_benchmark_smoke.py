"""Smoke test of the efficiency-benchmark machinery on a test-sized UNETR (no timing is asserted)."""

from __future__ import annotations

import json
import statistics

import pytest

from benchmarks.efficiency import markdown_report, run_benchmark, write_outputs


def tiny_config(isolate: bool) -> dict:
    return {
        "output_dir": "unused", "stem": "smoke",
        "run": {"device": "cpu", "threads": 1, "size": 32, "batch": 1, "seed": 0, "warmup_steps": 0, "steps": 1,
                "infer_warmup": 0, "infer_reps": 1, "isolate": isolate, "backbones": ["tiny"]},
        "backbones": {"tiny": {
            "model": {"name": "unetr", "in_channels": 1, "out_channels": 2, "feature_size": 8, "hidden_size": 96,
                      "mlp_dim": 192, "num_heads": 4, "proj_type": "conv", "norm_name": "instance",
                      "dropout_rate": 0.0},
            "targets": ["attn.qkv", "attn.out_proj", "mlp.linear1", "mlp.linear2"],
            "decoder": ["decoder2", "decoder3", "decoder4", "decoder5", "out.conv.conv"],
            "floor_module": "vit.patch_embedding", "reference": "lora",
            "arms": {"decoder_only": {"name": "decoder_only"}, "floor": {"name": "floor"},
                     "lora": {"name": "lora", "r": 4}, "tcurlora": {"name": "tcurlora", "r": 4, "grouping": "paper"},
                     "lorapt": {"name": "lorapt", "r": 2, "grouping": "paper"}},
        }},
    }


@pytest.mark.parametrize("isolate", [False])
def test_benchmark_structure(tmp_path, isolate):
    result = run_benchmark(tiny_config(isolate), log=lambda *_: None)
    js, md = write_outputs(result, tmp_path, "smoke")
    data = json.loads(js.read_text())
    assert set(data) >= {"machine", "versions", "load_average_start", "backbones", "config"}
    b = data["backbones"]["tiny"]
    arms = b["arms"]
    assert list(arms) == ["decoder_only", "floor", "lora", "tcurlora", "lorapt"]
    for a in arms.values():
        for key in ("trainable", "adapter_file_bytes", "setup_s", "step_s", "step_cpu_s", "peak_rss_mb", "infer_s",
                    "infer_vs_base", "vs_ref", "note"):
            assert key in a, key
        assert len(a["step_wall_samples"]) == 1
    assert arms["floor"]["trainable"] == 0 and arms["floor"]["adapter_file_bytes"] == 0
    assert arms["tcurlora"]["trainable"] == 4 * 4 * (48 + 12 + 12)  # r^2 * sum(L), paper grouping
    # the reference is PEFT LoRA (r=4 on the 4 targets of the 12 blocks: r * (in + out) each), and every arm's ratios
    # are its own numbers over LoRA's, not over its own (which would make every ratio 1)
    lora = arms["lora"]
    assert b["reference_arm"] == "lora" and lora["method"] == "lora"
    assert lora["trainable"] == 12 * 4 * ((96 + 288) + (96 + 96) + (96 + 192) + (192 + 96))
    for name, a in arms.items():
        r = a["vs_ref"]
        assert r["step"] == pytest.approx(a["step_s"] / lora["step_s"]), name
        assert r["step_cpu"] == pytest.approx(a["step_cpu_s"] / lora["step_cpu_s"]), name
        assert r["peak_rss"] == pytest.approx(a["peak_rss_mb"] / lora["peak_rss_mb"]), name
        assert r["setup"] == pytest.approx(a["setup_s"] / lora["setup_s"]), name
        assert a["infer_vs_base"] == pytest.approx(a["infer_s"] / arms["floor"]["infer_s"]), name
    for name in ("tcurlora", "lorapt"):
        ratio = arms[name]["adapter_file_bytes"] / lora["adapter_file_bytes"]
        assert arms[name]["vs_ref"]["adapter_file"] == pytest.approx(ratio) != 1, name
    assert arms["tcurlora"]["note"] == "merged" and arms["lora"]["note"] == "merged"
    assert arms["tcurlora"]["adapter_file_bytes"] < arms["lora"]["adapter_file_bytes"]
    checks = b["targets_checked"]
    assert {c["arm"] for c in checks} == {"tcurlora", "lorapt"} and len(checks) == 14

    text = md.read_text()
    assert text == markdown_report(data)
    assert "| arm | trainable |" in text and "Load average" in text and "torch" in text
    for label in ("decoder_only", "floor", "lora (ref)", "tcurlora", "lorapt"):
        assert f"| {label} |" in text


def test_compare_versions_pairs_each_arm_with_its_own_trees_reference(tmp_path):
    """Two source trees (here both this checkout) in one round robin: every worker process imports its own tree, each
    row's ratio is against the same tree's LoRA step of the same round, and the markdown names every tree and arm."""
    from benchmarks._common import REPO
    from benchmarks.compare_versions import markdown, run

    res = run(tiny_config(True), "tiny", ["tcurlora"], {"base": REPO, "head": REPO}, steps=2, warmup=0,
              log=lambda *_: None)
    rows = {(r["tree"], r["arm"]): r for r in res["rows"]}
    assert set(rows) == {(t, a) for t in ("base", "head") for a in ("lora", "tcurlora")}  # reference added
    for t in ("base", "head"):
        assert rows[(t, "lora")]["ratio_wall"] == 1.0 and rows[(t, "lora")]["ratio_cpu"] == 1.0
        tc, ref = rows[(t, "tcurlora")]["wall_samples"], rows[(t, "lora")]["wall_samples"]
        assert len(tc) == 2 and rows[(t, "tcurlora")]["ratio_wall"] == pytest.approx(
            statistics.median(a / b for a, b in zip(tc, ref)), rel=1e-2)  # samples are rounded to 0.1 ms
    md = markdown(res)
    assert md.count("| base |") == 2 and md.count("| head |") == 2
