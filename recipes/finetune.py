"""Few-shot fine-tuning of a pretrained backbone on the target task, with one arm.

Arms (``arm.name``): tcurlora, lorapt, hyps, lora, pissa, full, decoder_only, frozen -- see
:mod:`peft_tensor.training.arms`. In every PEFT arm the decoder and head train too, as in the papers.

    peft-tensor run finetune --config finetune_cpu arm.name=tcurlora data.n_train=5 \
        model.pretrained=runs/pretrain/backbone

Writes to ``output_dir``: ``adapter/`` (PEFT ``save_pretrained`` + card, or ``trainable.safetensors`` for the
non-PEFT arms), ``metrics.{csv,jsonl}``, ``curves.png``, ``test_cases.csv``, ``results.json``,
``overlay_{best,worst}.png`` and ``checkpoint/checkpoint.safetensors`` (resumed automatically after an interruption).
"""

from __future__ import annotations

import time
from pathlib import Path

from tqdm.auto import tqdm

from peft_tensor.data import load_cases, load_dataset, sample_batch
from peft_tensor.data.transforms import augmentation
from peft_tensor.training import (Checkpointer, RunLogger, apply_arm, barrier, build_model, canonical_arm, cleanup,
                                  evaluate_cases, init_distributed, load_backbone, make_loss, make_optimizer,
                                  param_counts, poly_scheduler, save_trained, set_seed, step_seed, summarize,
                                  train_step, wrap_ddp, write_json, write_rows_csv)
from peft_tensor.training.arms import optimizer_settings
from peft_tensor.training.config import parse_recipe_args, patch_size, total_steps
from peft_tensor.training.loop import configure_threads
from peft_tensor.training.distributed import all_mean, main_process_first
from peft_tensor.training.plots import plot_best_worst, plot_curves


def main(cfg: dict) -> dict:
    dist = init_distributed(cfg.get("device", "auto"))
    out = Path(cfg["output_dir"])
    seed, train_cfg, arm = int(cfg.get("seed", 0)), cfg["train"], canonical_arm(cfg["arm"]["name"])
    patch = patch_size(cfg)
    set_seed(seed)
    configure_threads(cfg.get("threads"))
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", cfg)

    # data: the few-shot training subjects, validation and held-out test subjects
    data = main_process_first(dist, load_dataset, cfg["data"])  # builds the embedded cohort once
    spacing = cfg["data"].get("spacing_mm")
    train_cases = load_cases(data["train"], data.foreground, spacing, patch)
    val_cases = load_cases(data["val"], data.foreground, spacing, patch) if "val" in data.splits else []
    test_cases = load_cases(data["test"], data.foreground, spacing, patch) if "test" in data.splits else []

    # the pretrained backbone, then the arm (a PeftModel for PEFT arms)
    pretrained = cfg["model"].get("pretrained")
    model = load_backbone(pretrained, cfg["model"])[0] if pretrained else build_model(cfg["model"])
    set_seed(seed)  # adapter initialisation does not depend on how the backbone was obtained
    t_setup = time.time()
    model = apply_arm(model, cfg["arm"], cfg["model"]).to(dist.device)
    setup_s = time.time() - t_setup
    counts = param_counts(model)

    steps = total_steps(train_cfg, len(train_cases))
    optimizer = make_optimizer(model, {**cfg["optim"], **optimizer_settings(cfg["arm"])})
    scheduler = poly_scheduler(optimizer, steps, float(cfg["optim"].get("poly_power", 0.9)))
    loss_fn = make_loss(train_cfg.get("loss", "dice"))

    ckpt = Checkpointer(out / "checkpoint", train_cfg.get("checkpoint_every", 0), enabled=dist.is_main)
    start, _ = ckpt.resume(model, optimizer, scheduler)
    log = RunLogger(out, enabled=dist.is_main)
    log.truncate(start)
    ddp_model = wrap_ddp(model, dist)
    aug = augmentation(patch, float(train_cfg.get("crop_pos", 1)), float(train_cfg.get("crop_neg", 1)),
                       train_cfg.get("crop", "random"))
    batch, amp = int(train_cfg.get("batch_size", 2)), bool(train_cfg.get("amp", True))
    val_every, stop_after = int(train_cfg.get("val_every", 0)), train_cfg.get("stop_after")

    bar = tqdm(range(start, steps), desc=f"finetune {arm}", disable=not (dist.is_main and cfg.get("progress", True)))
    t0 = time.time()
    for step in bar:
        step_seed(seed, step, dist.rank)
        images, labels = sample_batch(train_cases, step, batch, seed, patch, dist.rank, dist.world_size, aug)
        loss = all_mean(train_step(ddp_model, images, labels, loss_fn, optimizer, scheduler, amp), dist)
        row = {"step": step, "loss": loss, "lr": scheduler.get_last_lr()[0], "time_s": time.time() - t0}
        if val_every and (step + 1) % val_every == 0 and val_cases and dist.is_main:
            row["val_dice"] = summarize(evaluate_cases(model, val_cases, patch, amp=amp))["dice"]["mean"]
        log.log(**row)
        bar.set_postfix(loss=f"{loss:.3f}")
        if ckpt.due(step):
            ckpt.save(step + 1, model, optimizer, scheduler)
            barrier(dist)
        if stop_after is not None and step + 1 >= int(stop_after):  # simulated interruption (tests)
            cleanup(dist)
            return {"interrupted_at": step + 1}
    train_s = time.time() - t0

    result = {"arm": arm, "params": counts, "setup_s": setup_s, "train_s": train_s, "steps": steps,
              "n_train": len(train_cases)}
    if dist.is_main:
        eval_cfg = cfg.get("eval", {})
        rows, preds = evaluate_cases(model, test_cases, patch, float(eval_cfg.get("overlap", 0.5)),
                                     int(eval_cfg.get("min_component_voxels", 0)), amp, keep_predictions=True)
        result["test"] = summarize(rows)
        write_rows_csv(out / "test_cases.csv", rows)
        plot_best_worst(test_cases, preds, rows, out)
        plot_curves(log.rows, out / "curves.png", f"fine-tuning ({arm})")
        card = _card(cfg, arm, counts, result, data.description)
        save_trained(model, out / "adapter", arm, card)
        write_json(out / "results.json", result)
    barrier(dist)
    cleanup(dist)
    return result


def _card(cfg, arm, counts, result, data_description) -> str:
    t = result.get("test", {})
    fmt = lambda k: f"{t[k]['mean']:.4f} +- {t[k]['std']:.4f} (n={t[k]['n']})" if k in t else "n/a"  # noqa: E731
    return "\n".join([
        "## Fine-tuning run (peft_tensor recipe `finetune`)", "",
        f"- arm: `{arm}`; trainable parameters {counts['trainable']:,} of {counts['total']:,}",
        f"- backbone: `{cfg['model'].get('name', 'unetr')}` pretrained from `{cfg['model'].get('pretrained')}`",
        f"- data: {data_description}",
        f"- steps {result['steps']}, batch {cfg['train'].get('batch_size', 2)}, training subjects {result['n_train']}",
        f"- test Dice {fmt('dice')}; HD95 (mm, 95th percentile) {fmt('hd95')}; Jaccard {fmt('jaccard')}", "",
    ])


if __name__ == "__main__":
    main(parse_recipe_args(description=__doc__, default_config="finetune_cpu"))
