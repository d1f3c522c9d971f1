"""The learning-rate sweep's table (benchmarks/lr_sweep.py): each method's Dice per swept rate, the rate the recipes
give its adapter today, and the command that ran it."""

from __future__ import annotations

from benchmarks import lr_sweep
from peft_tensor.registry import BASELINE_LR, get_method


def _row(method, lr, dice):
    return {"method": method, "lr": lr, "steps": 120, "trainable": 10, "dice": dice}


def test_the_sweep_table_names_the_rate_the_recipes_use_and_the_best_swept_rate():
    rows = [_row("frozen", None, 0.05), _row("lora", 0.003, 0.15), _row("lora", 0.03, 0.24), _row("lora", 0.1, 0.2),
            _row("pissa", 0.01, 0.2), _row("tcurlora", 0.3, 0.21)]
    text = lr_sweep.markdown(rows, "Command: `python benchmarks/lr_sweep.py stem=x`")
    lines = text.splitlines()
    assert lines[2] == "| method | trainable | recipe lr | lr 0.003 | lr 0.01 | lr 0.03 | lr 0.1 | lr 0.3 |"
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[4:8]}
    assert cells["lora"] == ["10", f"{BASELINE_LR['lora']:g}", "0.150", "", "**0.240**", "0.200", ""]
    assert cells["pissa"][1] == f"{BASELINE_LR['pissa']:g}" and cells["pissa"][3] == "0.200"  # one rate: no bold
    assert cells["tcurlora"][1] == f"{get_method('tcurlora').lr:g}"
    assert cells["frozen"][1] == "—" and cells["frozen"][2] == "0.050 (head only)"
    assert text.rstrip().endswith("Command: `python benchmarks/lr_sweep.py stem=x`")
    assert lr_sweep.arm_for("pissa", 0.01) == {"name": "pissa", "decoder": "head", "method_lr": 0.01}  # r: the arm's
