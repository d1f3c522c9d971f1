"""Evaluate a fine-tuned run on a dataset split by sliding-window inference.

Metrics per case (MONAI): Dice, HD95 in mm (the 95th percentile of surface distances, not the maximum), Jaccard,
predicted and true volume in mL; with ``eval.min_component_voxels > 0`` also the same metrics after removing
smaller connected components, reported separately (``*_cc``) -- the authors' public evaluation does this before
Dice; it is not the standard metric.

    peft-tensor run evaluate_run --config evaluate_run run_dir=runs/finetune_cpu \
        [split=test data.kind=pairs data.root=...]

Reads ``run_dir/config.json`` (backbone, arm, data) and ``run_dir/adapter``; ``data`` given here replaces the run's
data (evaluate on another dataset; its task must have the run's classes). Writes ``output_dir`` (default
``run_dir/eval_<split>``): ``cases.csv`` (per class and the mean over classes), ``volumes.csv`` (id, predicted
volume of the union of the classes in mL -- the hippocampus: the input of ``diagnose`` -- and one column per class
when there are several), ``summary.json`` (``metrics``: the mean over classes; ``classes``; ``per_class``),
overlays (one colour per class).
"""

from __future__ import annotations

import json
from pathlib import Path

from peft_tensor.data import load_dataset
from peft_tensor.data.datasets import case_sources
from peft_tensor.training import (Extremes, check_output_channels, evaluate_cases, load_backbone, load_trained,
                                  model_config_for_task, summarize, summarize_per_class, write_json, write_rows_csv)
from peft_tensor.training.config import patch_size, run_recipe
from peft_tensor.training.plots import plot_extremes
from peft_tensor.training.schema import EvalConfig, fill_block, validate_config

DEFAULT_CONFIG = "evaluate_run"


def main(cfg: dict) -> dict:
    cfg = validate_config(cfg, "evaluate_run")  # defaults filled in (peft_tensor.training.schema.EvaluateRunConfig)
    run_dir = Path(cfg["run_dir"])
    run_cfg = json.loads((run_dir / "config.json").read_text())
    data_cfg = cfg["data"] or run_cfg["data"]
    split = cfg["split"]
    out = Path(cfg["output_dir"] or run_dir / f"eval_{split}")
    out.mkdir(parents=True, exist_ok=True)
    patch = patch_size(run_cfg)
    # the run's eval block (filled: a run written before the schema may lack keys), under this config's non-null keys
    eval_cfg = fill_block(EvalConfig, run_cfg.get("eval"), "eval")
    eval_cfg.update({k: v for k, v in cfg["eval"].items() if v is not None})

    # the data and its task (the classes the network must output)
    data = load_dataset(data_cfg)
    task = data.task
    sources, loader_cfg = case_sources(data, data_cfg, patch, out, cached=())  # read once: loaded case by case
    if split not in sources:
        raise KeyError(f"no split {split!r} in the data; available: {sorted(sources)}")
    trained = json.loads((run_dir / "results.json").read_text()).get("classes") \
        if (run_dir / "results.json").is_file() else None
    if trained and list(trained) != list(task.classes):
        raise ValueError(f"the run was trained on classes {trained}, the data to evaluate defines "
                         f"{list(task.classes)}: set data.task_type / data.classes to the run's classes")

    # the fine-tuned model: pretrained backbone + the run's adapter (or trained weights)
    model_cfg = model_config_for_task(run_cfg["model"], task)
    base, _ = load_backbone(model_cfg["pretrained"], model_cfg) if model_cfg.get("pretrained") else (None, None)
    if base is None:
        from peft_tensor.training import build_model

        base = build_model(model_cfg)
    if (run_dir / "base" / "model.safetensors").is_file():  # the run's own base weights (e.g. no pretrained source)
        from safetensors.torch import load_file

        base.load_state_dict(load_file(str(run_dir / "base" / "model.safetensors")))
    check_output_channels(base, task)
    model = load_trained(base, run_dir / "adapter", run_cfg["arm"]["name"])
    if cfg["merge"] and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()

    extremes = Extremes()
    rows = evaluate_cases(model, sources[split], patch, float(eval_cfg["overlap"]),
                          int(eval_cfg["min_component_voxels"]), progress=cfg["progress"],
                          task=task, extremes=extremes, num_workers=loader_cfg.num_workers)
    summary = {"run_dir": str(run_dir), "split": split, "n": len(rows), "metrics": summarize(rows),
               "classes": list(task.classes), "per_class": summarize_per_class(rows, task.classes)}
    write_rows_csv(out / "cases.csv", rows)
    several = len(task.classes) > 1
    write_rows_csv(out / "volumes.csv", [
        {"id": r["id"], "volume_ml": r["fg_volume_ml"] if several else r["volume_ml"],
         **({f"volume_ml:{c}": r[f"volume_ml:{c}"] for c in task.classes} if several else {})} for r in rows])
    write_json(out / "summary.json", summary)
    plot_extremes(extremes, out, task=task)
    m = summary["metrics"]
    print(f"{split}: n={len(rows)}  Dice {m['dice']['mean']:.4f}  HD95 {m['hd95']['mean']:.2f} mm  "
          f"Jaccard {m['jaccard']['mean']:.4f}  -> {out}")
    return summary


if __name__ == "__main__":
    run_recipe(main, description=__doc__, default_config=DEFAULT_CONFIG, schema="evaluate_run")
