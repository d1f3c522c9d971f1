"""Pretrain a backbone on the source task.

The papers pretrain UNETR / SwinUNETR on BraTS 2021 (whole tumour) before transferring to the hippocampus. Here
the source task is whatever ``data`` names: by default the other subcortical structures of the embedded cohort;
``data.kind=brats data.root=/path/to/BraTS2021`` for the papers' set-up.

    peft-tensor run pretrain --config pretrain_cpu [train.steps=300 output_dir=runs/pretrain]

Writes ``output_dir/backbone/`` (model.safetensors + backbone.json, what ``finetune``'s ``model.pretrained``
reads), ``metrics.{csv,jsonl}``, ``curves.png`` and ``checkpoint/checkpoint.safetensors`` (resumed automatically).
"""

from __future__ import annotations

import time
from pathlib import Path

from tqdm.auto import tqdm

from peft_tensor.data import load_dataset, train_loader
from peft_tensor.data.datasets import case_sources
from peft_tensor.data.transforms import augmentation
from peft_tensor.training import (Checkpointer, RunLogger, barrier, build_model, cleanup, evaluate_cases,
                                  init_distributed, make_loss, make_optimizer, model_config_for_task, poly_scheduler,
                                  save_backbone, set_seed, step_seed, summarize, summarize_per_class, train_step,
                                  wrap_ddp, write_json)
from peft_tensor.training.config import parse_recipe_args, patch_size, total_steps
from peft_tensor.training.loop import configure_threads
from peft_tensor.training.distributed import all_mean, main_process_first
from peft_tensor.training.plots import plot_curves


def main(cfg: dict) -> dict:
    dist = init_distributed(cfg.get("device", "auto"))
    out = Path(cfg["output_dir"])
    seed, train_cfg = int(cfg.get("seed", 0)), cfg["train"]
    patch = patch_size(cfg)
    set_seed(seed)
    configure_threads(cfg.get("threads"))
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", cfg)

    # data: preprocessed once (data.preprocess) and served by data.loader (cached in memory, on disk, or loaded per
    # use); batches are drawn per step in DataLoader workers (see peft_tensor.data.datasets)
    data = main_process_first(dist, load_dataset, cfg["data"])  # builds the embedded cohort once
    task = data.task
    sources, loader_cfg = case_sources(data, cfg["data"], patch, out)
    train_cases, val_cases = sources.get("train", []), sources.get("val", [])

    # model (output channels from the task), optimiser (Adam amsgrad), poly schedule, soft Dice
    model_cfg = model_config_for_task(cfg["model"], task)
    model = build_model(model_cfg).to(dist.device)
    steps = total_steps(train_cfg, len(train_cases))
    optimizer = make_optimizer(model, cfg["optim"])
    scheduler = poly_scheduler(optimizer, steps, float(cfg["optim"].get("poly_power", 0.9)))
    loss_fn = make_loss(train_cfg.get("loss", "dice"), task)

    # resume where an interrupted run stopped
    ckpt = Checkpointer(out / "checkpoint", train_cfg.get("checkpoint_every", 0), enabled=dist.is_main)
    start, _ = ckpt.resume(model, optimizer, scheduler)
    log = RunLogger(out, enabled=dist.is_main)
    log.truncate(start)
    ddp_model = wrap_ddp(model, dist)
    aug = augmentation(patch, float(train_cfg.get("crop_pos", 1)), float(train_cfg.get("crop_neg", 1)),
                       train_cfg.get("crop", "random"))
    batch, amp = int(train_cfg.get("batch_size", 2)), bool(train_cfg.get("amp", True))
    val_every, stop_after = int(train_cfg.get("val_every", 0)), train_cfg.get("stop_after")

    batches = iter(train_loader(train_cases, seed, batch, aug, start, steps, dist.rank, dist.world_size, loader_cfg,
                                dist.device, task.softmax))
    bar = tqdm(range(start, steps), desc="pretrain", disable=not (dist.is_main and cfg.get("progress", True)))
    t0 = time.time()
    for step in bar:
        step_seed(seed, step, dist.rank)
        images, labels = next(batches)
        loss = all_mean(train_step(ddp_model, images, labels, loss_fn, optimizer, scheduler, amp), dist)
        row = {"step": step, "loss": loss, "lr": scheduler.get_last_lr()[0], "time_s": time.time() - t0}
        if val_every and (step + 1) % val_every == 0 and val_cases and dist.is_main:
            row["val_dice"] = summarize(evaluate_cases(model, val_cases, patch, amp=amp, task=task))["dice"]["mean"]
        log.log(**row)
        bar.set_postfix(loss=f"{loss:.3f}")
        if ckpt.due(step):
            ckpt.save(step + 1, model, optimizer, scheduler)
            barrier(dist)
        if stop_after is not None and step + 1 >= int(stop_after):  # simulated interruption (tests)
            cleanup(dist)
            return {"interrupted_at": step + 1}

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
    main(parse_recipe_args(description=__doc__, default_config="pretrain_cpu"))
