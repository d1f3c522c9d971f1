"""Helpers shared by the tuner tests (tests/tuners/, tests/tuners/hyps/): inputs for the small models of
tests/_models.py, their output, the trainable parameters."""

from __future__ import annotations

import torch


def mlp_input(seed=1):
    """For ``TinyMLP``."""
    return {"x": torch.randn(4, 10, generator=torch.Generator().manual_seed(seed))}


def vit_input(seed=1):
    """For ``tiny_vit``."""
    return {"pixel_values": torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(seed))}


def bert_input(seed=1):
    """For ``tiny_bert``."""
    return {"input_ids": torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(seed))}


def unetr_input(seed=1):
    """For ``tiny_unetr`` (32^3)."""
    return {"x": torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(seed))}


def model_output(model, inputs):
    """The model's output tensor for one of the inputs above (a transformers model's ``last_hidden_state``)."""
    y = model(inputs["x"]) if "x" in inputs else model(**inputs)
    return y.last_hidden_state if hasattr(y, "last_hidden_state") else y


def trainable_params(model):
    """name -> parameter, for the parameters that require a gradient."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
