"""Atomic checkpoints with exact resume, stored as safetensors + JSON: nothing is ever pickled or unpickled.

A checkpoint holds the model's state dict, the optimiser and scheduler states, the step, a JSON-able ``extra`` dict
and the global RNG states (torch CPU and CUDA, numpy, ``random``). Batches, augmentation and dropout are seeded from
(seed, step) (see :mod:`peft_tensor.data.transforms` and :func:`step_seed`), so the RNG states are not needed to
continue an interrupted recipe bit for bit; they are restored so that any other loop continues exactly too.

One file, ``folder/checkpoint.safetensors``: every tensor (model state ``model/<name>``, optimiser state
``optimizer/...``, RNG state tensors ``rng/...``) is a safetensors tensor, and everything else (the nesting of the
optimiser and scheduler state dicts, numbers, strings, tuples, non-string keys) is JSON in the file's header metadata,
with ``{"__tensor__": name}`` where a tensor was. Loading it runs no pickle, so a checkpoint from an untrusted source
cannot execute code. Being one file, it is written atomically (a temporary file in the same folder, then
``os.replace``): a crash mid-write leaves the previous checkpoint intact and no partial file under the real name.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from safetensors import safe_open

from .._atomic import atomic_write

CHECKPOINT_NAME = "checkpoint.safetensors"
FORMAT = "peft_tensor.checkpoint"
VERSION = 1
# files that earlier versions wrote with torch.save (pickle): refused, never loaded
PICKLED_NAMES = ("checkpoint.pt",)

# JSON objects that stand for something JSON has no type for; a dict with one of these keys is stored as items
_MARKERS = ("__tensor__", "__ndarray__", "__tuple__", "__items__")


def _encode(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """``obj`` as JSON; its tensors go to ``tensors`` under ``path``-derived names (copies: no shared storage)."""
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        if path in tensors:  # keys that contain "/" could make two paths alike
            path = f"{path}#{len(tensors)}"
        if isinstance(obj, np.ndarray):
            tensors[path] = torch.from_numpy(np.ascontiguousarray(obj).copy())
            return {"__ndarray__": path}
        tensors[path] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": path}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not any(k in _MARKERS for k in obj):
            return {k: _encode(v, tensors, f"{path}/{k}") for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors, f"{path}/key{i}"), _encode(v, tensors, f"{path}/{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    raise TypeError(f"A checkpoint cannot hold a {type(obj).__name__} object (at {path!r}) without pickling it: "
                    "store tensors, arrays, numbers, strings, lists, tuples and dicts of these.")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        (key, value), = obj.items()
        if key == "__tensor__":
            return tensors[value]
        if key == "__ndarray__":
            return tensors[value].numpy()
        if key == "__tuple__":
            return tuple(_decode(v, tensors) for v in value)
        if key == "__items__":
            return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in value}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, (list, tuple)) else key


def rng_states() -> dict:
    """The global RNG states: torch CPU (and CUDA where initialised), numpy, ``random``."""
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["random"])
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class Checkpointer:
    """``save(step, ...)`` every ``every`` steps into ``folder/checkpoint.safetensors``; ``resume(...)`` returns the
    step to continue from (0 when there is nothing to resume)."""

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
        tensors: dict[str, torch.Tensor] = {}
        state = {
            "step": int(next_step),
            "model": _encode(dict(unwrap(model).state_dict()), tensors, "model"),
            "optimizer": _encode(optimizer.state_dict(), tensors, "optimizer") if optimizer is not None else None,
            "scheduler": _encode(scheduler.state_dict(), tensors, "scheduler") if scheduler is not None else None,
            "extra": _encode(dict(extra or {}), tensors, "extra"),
            "rng": _encode(rng_states(), tensors, "rng"),
        }
        metadata = {"format": FORMAT, "version": str(VERSION), "state": json.dumps(state)}
        # looked up at call time (not imported by name) so that a test can make the write fail
        atomic_write(self.path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=metadata))

    def resume(self, model, optimizer=None, scheduler=None) -> tuple[int, dict]:
        """Load ``folder/checkpoint.safetensors`` if present (and restore the RNG states). Returns (next step,
        extra)."""
        if not self.path.is_file():
            for name in PICKLED_NAMES:
                if (self.folder / name).is_file():
                    raise ValueError(
                        f"{self.folder / name} is a checkpoint written by an earlier peft_tensor with torch.save "
                        "(pickle), which is never loaded here: unpickling can run arbitrary code. Delete it to start "
                        "the run over, or finish the run with the peft_tensor version that wrote it.")
            return 0, {}
        with safe_open(str(self.path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            if metadata.get("format") != FORMAT or metadata.get("version") != str(VERSION):
                raise ValueError(f"{self.path} is not a peft_tensor checkpoint of format version {VERSION} "
                                 f"(header says {metadata.get('format')!r} version {metadata.get('version')!r}).")
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        state = _decode(json.loads(metadata["state"]), tensors)
        unwrap(model).load_state_dict(state["model"])
        if optimizer is not None and state.get("optimizer") is not None:
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        set_rng_states(state["rng"])
        return int(state["step"]), state.get("extra", {})


def unwrap(model):
    """The module inside a DistributedDataParallel wrapper (or ``model`` itself)."""
    return getattr(model, "module", model) if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
