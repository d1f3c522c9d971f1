"""The one-command demo: ``peft-tensor demo``.

1. build the embedded template-derived cohort (cached; see :mod:`peft_tensor.data.embedded`);
2. pretrain a small UNETR on the source task (other subcortical structures), or reuse the cached backbone;
3. fine-tune on the hippocampus from ``n_train`` subjects with each arm: tCURLoRA, decoder-only, frozen
   (head only);
4. evaluate on held-out subjects, write adapters + cards + plots, print a results table.

Every step is the corresponding recipe (``pretrain``, ``finetune``) run with the sections of the ``demo`` config;
nothing here is specific to the demo but the orchestration.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path

from peft_tensor.recipes import finetune, pretrain
from peft_tensor.training import write_json
from peft_tensor.training.config import run_recipe
from peft_tensor.training.schema import validate_config

DEFAULT_CONFIG = "demo"


def _backbone_dir(cfg: dict) -> Path:
    """Cached pretrained backbone, keyed by everything that determines it."""
    from peft_tensor.data.embedded import default_cache_dir

    key = {k: cfg[k] for k in ("seed", "data", "model")} | {"pretrain": cfg["pretrain"]}
    # the fine-tuning task does not change the pretraining (always data.task=source)
    key["data"] = {k: v for k, v in key["data"].items() if k not in ("cache_dir", "progress", "task", "shift")}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    root = Path(cfg["data"].get("cache_dir") or default_cache_dir())  # data: free-form, keyed by data.kind
    return root / f"demo-backbone-{digest}"


def main(cfg: dict) -> dict:
    cfg = validate_config(cfg, "demo")  # defaults filled in (peft_tensor.training.schema.DemoConfig)
    t_start = time.time()
    out = Path(cfg["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    print("peft-tensor demo: template-derived synthetic subjects (MNI152 2009c template + aseg labels), "
          "not patient data.")

    # 1-2. pretraining on the source task (reused from the cache when present)
    pre_dir, reused, pretrain_s = ensure_backbone(cfg)

    # 3-4. fine-tuning arms on the target task, each evaluated on the held-out subjects
    results = {}
    for arm in cfg["arms"]:
        name = arm_label(arm)
        results[name] = finetune_arm(cfg, arm, pre_dir / "backbone", out / name)
        results[name]["file_bytes"] = adapter_bytes(out / name / "adapter")

    total_s = time.time() - t_start
    table = format_table(results)
    summary = {"results": results, "pretrain_s": pretrain_s, "pretrain_reused": reused, "total_s": total_s,
               "note": "template-derived synthetic subjects, not patient data"}
    write_json(out / "demo_results.json", summary)
    (out / "demo_results.md").write_text(table + "\n")
    print()
    print(table)
    print(f"\ntotal {total_s:.0f} s (pretraining {'reused' if reused else f'{pretrain_s:.0f} s'}); outputs in {out}/")
    return summary


def arm_label(arm) -> str:
    """The arm's name in tables and folders: its ``label`` if it has one (e.g. ``tcurlora_adapter_only`` for
    ``{name: tcurlora, decoder: head}``), else its name."""
    return arm if isinstance(arm, str) else str(arm.get("label", arm["name"]))


def adapter_bytes(folder: Path) -> int:
    """Size of the saved trainable weights (``adapter_model.safetensors`` or ``trainable.safetensors``)."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"


def _common(cfg: dict) -> dict:
    return {k: cfg[k] for k in ("seed", "device", "progress", "threads") if k in cfg}


def ensure_backbone(cfg: dict) -> tuple[Path, bool, float]:
    """Pretrain on the source task with ``cfg["pretrain"]``, or reuse the cached backbone.

    Returns (pretraining folder, reused?, seconds); the backbone itself is ``<folder>/backbone``."""
    pre_dir = _backbone_dir(cfg)
    t0 = time.time()
    if cfg["reuse_pretrained"] and (pre_dir / "backbone" / "backbone.json").is_file():
        print(f"[pretrain] reusing cached backbone {pre_dir / 'backbone'}")
        reused = True
    else:
        pre_cfg = {**_common(cfg), "output_dir": str(pre_dir), "model": cfg["model"],
                   **copy.deepcopy(cfg["pretrain"])}
        # the source task, in the pretraining acquisition (data.shift describes the target_shift task only)
        pre_cfg["data"] = {**{k: v for k, v in cfg["data"].items() if k != "shift"}, "task": "source"}
        print(f"[pretrain] {pre_cfg['train']['steps']} steps on the source task -> {pre_dir}")
        pretrain.main(pre_cfg)
        reused = False
    return pre_dir, reused, time.time() - t0


def finetune_arm(cfg: dict, arm, backbone: Path, out_dir: Path, data: dict | None = None,
                 seed: int | None = None) -> dict:
    """Fine-tune one arm (a name or ``{name: ..., **options}``) on the target task from the saved ``backbone``
    with ``cfg["finetune"]``, evaluate it on the held-out subjects; ``finetune.main``'s result.

    ``data`` / ``seed`` replace ``cfg["data"]`` / ``cfg["seed"]`` for this run only (e.g. another ``n_train``).
    The task is ``data.task`` (``target``, the default, or ``target_shift``: the same subjects under an acquisition
    shift); ``source`` is the pretraining task and is refused."""
    arm_cfg = {"name": arm} if isinstance(arm, str) else dict(arm)
    name = arm_cfg["name"]
    data = cfg["data"] if data is None else data
    ft_cfg = {**_common(cfg), "output_dir": str(out_dir), **copy.deepcopy(cfg["finetune"])}
    stage_arm = ft_cfg.pop("arm", None) or {}
    if seed is not None:
        ft_cfg["seed"] = int(seed)
    task = data.get("task") or "target"
    if task == "source":
        raise ValueError("data.task=source is the pretraining task; fine-tune on data.task=target (the default) or "
                         "target_shift")
    ft_cfg["data"] = {**data, "task": task}
    ft_cfg["model"] = {**cfg["model"], "pretrained": str(backbone)}
    ft_cfg["arm"] = {**stage_arm, **arm_cfg} if name == stage_arm.get("name") else arm_cfg
    print(f"[finetune] {name}: {ft_cfg['train']['steps']} steps on {data.get('n_train', 5)} subjects")
    return finetune.main(ft_cfg)


def format_table(results: dict) -> str:
    """The arms' results (``finetune.main``'s, by arm label) as a markdown table, with the learning rates each arm
    trained at: ``adapter / rest`` where the adapter has its own rate, else the one rate of every parameter."""
    from peft_tensor.training.arms import format_rates

    lines = ["| arm | trainable params | lr (adapter / rest) | file | test Dice | test HD95 (mm) | Jaccard | "
             "train time (s) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        t = r.get("test", {})

        def f(k, digits=3):
            return f"{t[k]['mean']:.{digits}f} ± {t[k]['std']:.{digits}f}" if k in t and t[k]["n"] else "n/a"

        size = _size(r["file_bytes"]) if "file_bytes" in r else "n/a"
        lines.append(f"| {name} | {r['params']['trainable']:,} | {format_rates(r.get('rates'))} | {size} | "
                     f"{f('dice')} | {f('hd95', 2)} | "
                     f"{f('jaccard')} | {r.get('train_s', float('nan')):.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    run_recipe(main, description=__doc__, default_config=DEFAULT_CONFIG, schema="demo")
