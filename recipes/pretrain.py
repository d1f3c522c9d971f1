"""Pretrain a backbone on the source task.

The papers pretrain UNETR / SwinUNETR on BraTS 2021 (whole tumour) before transferring to the hippocampus. Here
the source task is whatever ``data`` names: by default the other subcortical structures of the embedded cohort;
``data.kind=brats data.root=/path/to/BraTS2021`` for the papers' set-up.

    peft-tensor run pretrain --config pretrain_cpu [train.steps=300 output_dir=runs/pretrain]

Writes ``output_dir/backbone/`` (model.safetensors + backbone.json, what ``finetune``'s ``model.pretrained``
reads), ``metrics.{csv,jsonl}``, ``curves.png`` and ``checkpoint/checkpoint.safetensors`` (resumed automatically).
"""

from __future__ import annotations


from peft_tensor.training import (barrier, build_model, cleanup, evaluate_cases, model_config_for_task, save_backbone,
                                  summarize, summarize_per_class, write_json)
from peft_tensor.training.config import run_recipe
from peft_tensor.training.loop import start_run, train_loop
from peft_tensor.training.plots import plot_curves
from peft_tensor.training.schema import config_block, validate_config


def main(cfg: dict) -> dict:
    cfg = validate_config(cfg, "pretrain")  # defaults filled in (peft_tensor.training.schema.PretrainConfig)
    # the run: process group, seed, run folder; data preprocessed once (data.preprocess) and served by data.loader
    # (cached in memory, on disk, or loaded per use); batches are drawn per step in DataLoader workers
    run = start_run(cfg)
    dist, out, patch, data, task = run.dist, run.out, run.patch, run.data, run.task
    sources, loader_cfg = run.sources, run.loader_cfg
    train_cases, val_cases = sources.get("train", []), sources.get("val", [])

    # model (output channels from the task), then the shared loop: Adam amsgrad, poly schedule, soft Dice
    with config_block("model"):  # an error here is one line naming the block (peft-tensor run)
        model_cfg = model_config_for_task(cfg["model"], task)
        model = build_model(model_cfg).to(dist.device)
    run = train_loop(model, cfg, cfg["optim"], train_cases, val_cases, task, patch, loader_cfg, dist, out,
                     desc="pretrain")
    if run.interrupted_at is not None:
        cleanup(dist)
        return {"interrupted_at": run.interrupted_at}
    steps, log, amp = run.steps, run.log, bool(cfg["train"]["amp"])

    result = {"steps": steps, "task_type": task.kind, "classes": list(task.classes)}
    if dist.is_main:
        save_backbone(model, model_cfg, out / "backbone", {"source_task": data.description, "steps": steps,
                                                           "task": task.to_dict()})
        if val_cases:
            rows = evaluate_cases(model, val_cases, patch, amp=amp, task=task)
            result["val"], result["val_per_class"] = summarize(rows), summarize_per_class(rows, task.classes)
        plot_curves(log.rows, out / "curves.png", "pretraining")
        write_json(out / "results.json", result)
    barrier(dist)
    cleanup(dist)
    return result


if __name__ == "__main__":
    run_recipe(main, description=__doc__, default_config="pretrain_cpu", schema="pretrain")
