"""Evaluate a fine-tuned run on a dataset split by sliding-window inference.

Metrics per case (MONAI): Dice, HD95 in mm (the 95th percentile of surface distances, not the maximum), Jaccard,
predicted and true volume in mL; with ``eval.min_component_voxels > 0`` also the same metrics after removing
smaller connected components, reported separately (``*_cc``) -- the authors' public evaluation does this before
Dice; it is not the standard metric.

    peft-tensor run evaluate_run --config evaluate_run run_dir=runs/finetune_cpu \
        [split=test data.kind=pairs data.root=...]

Reads ``run_dir/config.json`` (backbone, arm, data) and ``run_dir/adapter``; ``data`` given here replaces the run's
data (evaluate on another dataset). Writes ``output_dir`` (default ``run_dir/eval_<split>``): ``cases.csv``,
``volumes.csv`` (id, hippocampal volume in mL: the input of ``diagnose``), ``summary.json``, overlays.
"""

from __future__ import annotations

import json
from pathlib import Path

from peft_tensor.data import load_cases, load_dataset
from peft_tensor.training import (evaluate_cases, load_backbone, load_trained, summarize, write_json,
                                  write_rows_csv)
from peft_tensor.training.config import parse_recipe_args, patch_size
from peft_tensor.training.plots import plot_best_worst

DEFAULT_CONFIG = "evaluate_run"


def main(cfg: dict) -> dict:
    run_dir = Path(cfg["run_dir"])
    run_cfg = json.loads((run_dir / "config.json").read_text())
    data_cfg = cfg.get("data") or run_cfg["data"]
    split = cfg.get("split", "test")
    out = Path(cfg.get("output_dir") or run_dir / f"eval_{split}")
    out.mkdir(parents=True, exist_ok=True)
    patch = patch_size(run_cfg)
    eval_cfg = {**run_cfg.get("eval", {}), **cfg.get("eval", {})}

    # the fine-tuned model: pretrained backbone + the run's adapter (or trained weights)
    base, _ = load_backbone(run_cfg["model"]["pretrained"], run_cfg["model"]) if run_cfg["model"].get("pretrained") \
        else (None, None)
    if base is None:
        from peft_tensor.training import build_model

        base = build_model(run_cfg["model"])
    model = load_trained(base, run_dir / "adapter", run_cfg["arm"]["name"])
    if cfg.get("merge") and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()

    data = load_dataset(data_cfg)
    cases = load_cases(data[split], data.foreground, data_cfg.get("spacing_mm"), patch)
    rows, preds = evaluate_cases(model, cases, patch, float(eval_cfg.get("overlap", 0.5)),
                                 int(eval_cfg.get("min_component_voxels", 0)), keep_predictions=True,
                                 progress=cfg.get("progress", True))
    summary = {"run_dir": str(run_dir), "split": split, "n": len(rows), "metrics": summarize(rows)}
    write_rows_csv(out / "cases.csv", rows)
    write_rows_csv(out / "volumes.csv", [{"id": r["id"], "volume_ml": r["volume_ml"]} for r in rows])
    write_json(out / "summary.json", summary)
    plot_best_worst(cases, preds, rows, out)
    m = summary["metrics"]
    print(f"{split}: n={len(rows)}  Dice {m['dice']['mean']:.4f}  HD95 {m['hd95']['mean']:.2f} mm  "
          f"Jaccard {m['jaccard']['mean']:.4f}  -> {out}")
    return summary


if __name__ == "__main__":
    main(parse_recipe_args(description=__doc__, default_config=DEFAULT_CONFIG))
