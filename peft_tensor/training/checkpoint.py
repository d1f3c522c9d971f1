"""Atomic checkpoints with exact resume.

A checkpoint holds the model's state dict, the optimiser and scheduler states and the step. Batches, augmentation
and dropout are seeded from (seed, step) (see :mod:`peft_tensor.data.transforms` and :func:`step_seed`), so
nothing else is needed to continue an interrupted run bit for bit.

Writes go to a temporary file in the same folder followed by ``os.replace``: a crash mid-write leaves the previous
checkpoint intact and no partial file under the real name.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .._atomic import atomic_write

CHECKPOINT_NAME = "checkpoint.pt"


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


class Checkpointer:
    """``save(step, ...)`` every ``every`` steps into ``folder/checkpoint.pt``; ``resume(...)`` returns the step to
    continue from (0 when there is nothing to resume)."""

    def __init__(self, folder: str | os.PathLike, every: int = 0, enabled: bool = True):
        self.folder = Path(folder)
        self.every = int(every or 0)
        self.enabled = enabled
        self.path = self.folder / CHECKPOINT_NAME

    def due(self, step: int) -> bool:
        """True after step index ``step`` completes when a checkpoint is due (``step`` counts from 0)."""
        return self.every > 0 and (step + 1) % self.every == 0

    def save(self, next_step: int, model, optimizer=None, scheduler=None, extra: dict | None = None) -> None:
        if not self.enabled:
            return
        state = {
            "step": int(next_step),
            "model": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "extra": extra or {},
        }
        atomic_torch_save(state, self.path)

    def resume(self, model, optimizer=None, scheduler=None) -> tuple[int, dict]:
        """Load ``folder/checkpoint.pt`` if present. Returns (next step, extra)."""
        if not self.path.is_file():
            return 0, {}
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        unwrap(model).load_state_dict(state["model"])
        if optimizer is not None and state.get("optimizer") is not None:
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        return int(state["step"]), state.get("extra", {})


def unwrap(model):
    """The module inside a DistributedDataParallel wrapper (or ``model`` itself)."""
    return getattr(model, "module", model) if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
