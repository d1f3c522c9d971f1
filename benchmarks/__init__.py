"""Benchmarks (not part of the installed package), PEFT's ``method_comparison/`` way: scripts, their configs in
``configs/`` and their outputs in ``results/``. They build backbones and arms with the recipes' code
(:mod:`peft_tensor.training`) and read configs with the recipes' reader (:mod:`peft_tensor.training.config`)."""
