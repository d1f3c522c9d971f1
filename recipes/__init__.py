"""The recipes: one readable script per experiment, with YAML configs in ``configs/``.

This folder is the repository's top-level ``recipes/``; the wheel ships it as the ``peft_tensor.recipes`` package
(a setuptools ``package-dir`` mapping), so ``peft-tensor run`` works after ``pip install``. Run a recipe with
``peft-tensor run <recipe> --config <name> [key=value ...]`` or ``python -m peft_tensor.recipes.<recipe> ...``;
copy one with ``peft-tensor copy <recipe> <dest>`` to make it your own. Multi-process: ``peft-tensor run <recipe>
--nproc 2 ...`` (torchrun underneath)."""

RECIPES = {
    "pretrain": "Pretrain a UNETR / SwinUNETR on the source task (full training).",
    "finetune": "Few-shot fine-tuning with one arm (see `peft-tensor list` for the arms).",
    "evaluate_run": "Sliding-window evaluation of a fine-tuned run: Dice, HD95, Jaccard, volume (mL).",
    "diagnose": "Hippocampal volumes + metadata -> AD vs CN and EMCI vs LMCI, cross-validated.",
    "demo": "Embedded data -> pretrain -> tCURLoRA vs decoder-only vs frozen on 5 subjects -> results table.",
}

# Former recipe names that still run (``evaluate.py`` was renamed: a script folder on sys.path holding
# ``evaluate.py`` shadowed the ``evaluate`` package that transformers probes for).
RENAMED = {"evaluate": "evaluate_run"}
