"""Few-shot fine-tuning of a pretrained backbone on the target task, with one arm.

Arms (``arm.name``): tcurlora, lorapt, hyps, lora, pissa, full, decoder_only, frozen -- see
:mod:`peft_tensor.training.arms`. In every PEFT arm the decoder and head train too, as in the papers.

    peft-tensor run finetune --config finetune_cpu arm.name=tcurlora data.n_train=5 \
        model.pretrained=runs/pretrain/backbone

Binary, multi-class (``data.task_type=multiclass``, e.g. MSD Task04's anterior / posterior) and multi-label
(``multilabel``, e.g. BraTS regions) tasks; ``model.out_channels`` follows the task. Cases are preprocessed by
``data.preprocess`` and served by ``data.loader`` (MONAI Dataset / CacheDataset / PersistentDataset, DataLoader
workers); see :mod:`peft_tensor.data`.

Writes to ``output_dir``: ``adapter/`` (PEFT ``save_pretrained`` + card, or ``trainable.safetensors`` for the
non-PEFT arms), ``metrics.{csv,jsonl}``, ``curves.png``, ``test_cases.csv`` (per class and mean),
``results.json`` (``test``: the mean over classes; ``classes``; ``test_per_class``), ``overlay_{best,worst}.png``
(one colour per class) and ``checkpoint/checkpoint.safetensors`` (resumed automatically after an interruption).
"""

from __future__ import annotations

import time

from peft_tensor.training import (Extremes, apply_arm, barrier, build_model, canonical_arm, check_output_channels,
                                  cleanup, evaluate_cases, load_backbone, model_config_for_task,
                                  param_counts, set_seed, summarize, summarize_per_class, write_json, write_rows_csv)
from peft_tensor.training.arms import arm_rates, format_rates, optimizer_settings
from peft_tensor.training.config import run_recipe
from peft_tensor.training.loop import start_run, train_loop
from peft_tensor.training.plots import plot_curves, plot_extremes
from peft_tensor.training.schema import config_block, validate_config


def main(cfg: dict) -> dict:
    cfg = validate_config(cfg, "finetune")  # defaults filled in (peft_tensor.training.schema.FinetuneConfig)
    arm = canonical_arm(cfg["arm"]["name"])
    # the run: process group, seed, run folder; the few-shot training subjects, validation and held-out test
    # subjects, and the task (classes) they define
    run = start_run(cfg)
    dist, out, seed, patch, data, task = run.dist, run.out, run.seed, run.patch, run.data, run.task
    sources, loader_cfg = run.sources, run.loader_cfg
    train_cases, val_cases, test_cases = (sources.get(s, []) for s in ("train", "val", "test"))

    # the pretrained backbone (its output channels must fit the task), then the arm (a PeftModel for PEFT arms)
    with config_block("model"):  # an error here is one line naming the block (peft-tensor run)
        model_cfg = model_config_for_task(cfg["model"], task)
        pretrained = model_cfg.get("pretrained")  # model: a free-form block (peft_tensor.training.schema.check_model)
        with config_block("model.pretrained" if pretrained else "model"):
            model = load_backbone(pretrained, model_cfg)[0] if pretrained else build_model(model_cfg)
        check_output_channels(model, task)
    set_seed(seed)  # adapter initialisation does not depend on how the backbone was obtained
    t_setup = time.time()
    with config_block("arm"):
        model = apply_arm(model, cfg["arm"], model_cfg).to(dist.device)
    setup_s = time.time() - t_setup
    counts = param_counts(model)

    # the shared loop; the arm's learning rates (method_lr for the adapter factors) over the optim block
    run = train_loop(model, cfg, {**cfg["optim"], **optimizer_settings(cfg["arm"])}, train_cases, val_cases, task,
                     patch, loader_cfg, dist, out, desc=f"finetune {arm}")
    if run.interrupted_at is not None:
        cleanup(dist)
        return {"interrupted_at": run.interrupted_at}
    steps, log, train_s, amp = run.steps, run.log, run.train_s, bool(cfg["train"]["amp"])

    result = {"arm": arm, "params": counts, "setup_s": setup_s, "train_s": train_s, "steps": steps,
              "n_train": len(train_cases), "task_type": task.kind, "classes": list(task.classes),
              "rates": arm_rates(cfg["arm"], cfg["optim"])}  # the adapter's and the decoder's, as trained
    if dist.is_main:
        eval_cfg = cfg["eval"]
        extremes = Extremes()  # only the best and worst case are kept for the overlays, not every prediction
        rows = evaluate_cases(model, test_cases, patch, float(eval_cfg["overlap"]),
                              int(eval_cfg["min_component_voxels"]), amp, task=task, extremes=extremes,
                              num_workers=loader_cfg.num_workers)
        result["test"] = summarize(rows)  # per case the mean over classes, then mean / std / n over cases
        result["test_per_class"] = summarize_per_class(rows, task.classes)
        write_rows_csv(out / "test_cases.csv", rows)
        plot_extremes(extremes, out, task=task)
        plot_curves(log.rows, out / "curves.png", f"fine-tuning ({arm})")
        from peft_tensor.training.outputs import save_outputs  # adapter + provenance + our card, ready to push

        save_outputs(model, out / "adapter", arm=arm, model_cfg=model_cfg, result=result, data_cfg=cfg["data"],
                     data_description=data.description, details=_card(cfg, arm, counts, result),
                     card_cfg=cfg["card"])
        write_json(out / "results.json", result)
    barrier(dist)
    cleanup(dist)
    return result


def _card(cfg, arm, counts, result) -> str:
    """The run summary in the adapter's model card (results and data have their own sections there)."""
    rates = result.get("rates") or arm_rates(cfg["arm"], cfg["optim"])
    lrs = (f"lr {format_rates(rates)} (adapter / decoder and head)" if rates["method_lr"] is not None
           else f"lr {format_rates(rates)}")
    options = {k: v for k, v in cfg["arm"].items() if k != "name"}
    classes = result.get("classes") or []
    return "\n".join([
        "### Fine-tuning run (peft_tensor recipe `finetune`)", "",
        f"- arm: `{arm}` {options or ''}; trainable parameters {counts['trainable']:,} of {counts['total']:,}",
        f"- backbone: `{cfg['model'].get('name', 'unetr')}`, pretrained weights from "
        f"`{cfg['model'].get('pretrained') or 'none (random initialisation)'}`",
        f"- task: {result.get('task_type', 'binary')}" + (f", classes {', '.join(map(str, classes))}"
                                                          if classes else ""),
        f"- {result['steps']} steps, batch {cfg['train']['batch_size']}, {result['n_train']} training cases, "
        f"loss {cfg['train']['loss']}, {lrs}, seed {cfg['seed']}",
        f"- training time {result.get('train_s', float('nan')):.0f} s", "",
    ])


if __name__ == "__main__":
    run_recipe(main, description=__doc__, default_config="finetune_cpu", schema="finetune")
