"""The table of benchmarks/shift_gap.py: Dice per arm and seed, the paired gap and whether it exceeds seed noise."""

from __future__ import annotations

from benchmarks.shift_gap import task_table


def _runs(full, decoder):
    return [{"task": "t", "arm": arm, "seed": s, "dice": d, "train_s": 1.0}
            for arm, values in (("full", full), ("decoder_only", decoder)) for s, d in enumerate(values)]


def test_gap_is_paired_by_seed_and_judged_against_seed_noise():
    arms, seeds, gap = ["full", "decoder_only"], [0, 1, 2], ("full", "decoder_only")
    lines = task_table(_runs([0.70, 0.72, 0.71], [0.60, 0.61, 0.60]), "t", arms, seeds, gap)
    assert lines[2] == "| full | 0.700 | 0.720 | 0.710 | 0.710 ± 0.010 | 1 |"
    assert lines[-1].startswith(
        "| gap full - decoder_only | +0.100 | +0.110 | +0.110 | +0.107 ± 0.006 | discriminates")

    # a gap of the size of the arms' own seed spread is not a discrimination
    noisy = task_table(_runs([0.70, 0.60, 0.65], [0.62, 0.58, 0.60]), "t", arms, seeds, gap)
    assert "within seed noise" in noisy[-1]
    # a seed with one arm missing is left out of the paired gap
    partial = task_table(_runs([0.70, 0.72], [0.60]), "t", arms, seeds, gap)
    assert "| +0.100 | — | — |" in partial[-1] and "one seed: no verdict" in partial[-1]
