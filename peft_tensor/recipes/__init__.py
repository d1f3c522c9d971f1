"""The recipes: one readable script per experiment, with YAML configs in ``configs/``.

Run them with ``peft-tensor run <recipe> --config <name> [key=value ...]`` or ``python -m
peft_tensor.recipes.<recipe> ...``; copy one with ``peft-tensor copy <recipe> <dest>`` to make it your own.
Multi-process: ``peft-tensor run <recipe> --nproc 2 ...`` (torchrun underneath)."""

RECIPES = {
    "pretrain": "Pretrain a UNETR / SwinUNETR on the source task (full training).",
    "finetune": "Few-shot fine-tuning with one arm (tcurlora, lorapt, hyps, lora, pissa, full, decoder_only, frozen).",
    "evaluate": "Sliding-window evaluation of a fine-tuned run: Dice, HD95, Jaccard, volume (mL).",
    "diagnose": "Hippocampal volumes + metadata -> AD vs CN and EMCI vs LMCI, cross-validated.",
    "demo": "Embedded data -> pretrain -> tCURLoRA vs decoder-only vs frozen on 5 subjects -> results table.",
}
