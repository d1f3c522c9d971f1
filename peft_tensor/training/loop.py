"""Pieces of a training loop: optimiser, schedule, loss, one step, sliding-window evaluation, seeding."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from ..data.transforms import seed_for
from .metrics import case_metrics


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def step_seed(seed: int, step: int, rank: int = 0) -> None:
    """Seed torch's RNG (dropout) from (seed, step, rank): a resumed run draws the same dropout masks."""
    torch.manual_seed(seed_for(seed, "torch", step, rank))


def make_optimizer(model: torch.nn.Module, cfg: dict) -> torch.optim.Optimizer:
    """Adam (amsgrad) as in the papers: ``lr`` 1e-3, ``weight_decay`` 2e-5. ``method_lr`` (optional) is the
    learning rate of the adapter factors, the decoder/head (``modules_to_save``) keep ``lr``."""
    lr = float(cfg.get("lr", 1e-3))
    wd = float(cfg.get("weight_decay", 2e-5))
    method_lr = cfg.get("method_lr")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameter")
    if method_lr is None:
        groups = [{"params": [p for _, p in named], "lr": lr}]
    else:
        dec = [p for n, p in named if "modules_to_save" in n]
        ada = [p for n, p in named if "modules_to_save" not in n]
        groups = [g for g in ({"params": dec, "lr": lr}, {"params": ada, "lr": float(method_lr)}) if g["params"]]
    name = str(cfg.get("name", "adam")).lower()
    if name == "sgd":  # for checks that must not be amplified by Adam's normalisation (e.g. DDP equivalence)
        return torch.optim.SGD(groups, lr=lr, weight_decay=wd, momentum=float(cfg.get("momentum", 0.0)))
    if name != "adam":
        raise ValueError(f"unknown optimiser {name!r}: use 'adam' (the papers) or 'sgd'")
    return torch.optim.Adam(groups, lr=lr, weight_decay=wd, amsgrad=bool(cfg.get("amsgrad", True)))


def poly_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, power: float = 0.9):
    """Polynomial decay ``(1 - step / total) ** power`` (the papers' schedule, stepped per iteration)."""
    total = max(int(total_steps), 1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / total) ** power)


def make_loss(name: str = "dice"):
    """``dice``: soft Dice on background + foreground (the papers); ``dicece``: Dice + cross-entropy."""
    from monai.losses import DiceCELoss, DiceLoss

    name = str(name).lower()
    if name == "dice":
        return DiceLoss(to_onehot_y=True, softmax=True, include_background=True)
    if name in ("dicece", "dice_ce"):
        return DiceCELoss(to_onehot_y=True, softmax=True, include_background=True)
    raise ValueError(f"unknown loss {name!r}: use 'dice' or 'dicece'")


def autocast(device: torch.device, enabled: bool):
    """bfloat16 autocast on CUDA when ``enabled``; nothing on CPU."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model, images, labels, loss_fn, optimizer, scheduler=None, amp: bool = False,
               grad_clip: float | None = None) -> float:
    """One optimisation step. Returns the loss (of this process's slice of the batch)."""
    device = next(p for p in model.parameters()).device
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, amp):
        logits = model(images.to(device))
    loss = loss_fn(logits.float(), labels.to(device))
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return float(loss.detach())


@torch.no_grad()
def predict(model, image: torch.Tensor, patch, overlap: float = 0.5, sw_batch_size: int = 4, amp: bool = False):
    """Binary prediction [X, Y, Z] (bool) of one preprocessed image [1, X, Y, Z] by sliding-window inference."""
    from monai.inferers import sliding_window_inference

    device = next(p for p in model.parameters()).device
    model.eval()
    with autocast(device, amp):
        logits = sliding_window_inference(image[None].to(device), tuple(patch), sw_batch_size, model,
                                          overlap=overlap, mode="gaussian")
    return (torch.as_tensor(logits).float().argmax(1)[0] == 1).cpu()


def evaluate_cases(model, cases: list, patch, overlap: float = 0.5, min_component_voxels: int = 0,
                   amp: bool = False, keep_predictions: bool = False, progress: bool = False):
    """Per-case metrics (:func:`peft_tensor.training.metrics.case_metrics`) of ``model`` on ``cases``.

    Returns rows (dicts with ``id``), and the predictions if ``keep_predictions``."""
    rows, preds = [], []
    it = cases
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(cases, desc="evaluate", unit="case", leave=False)
    for case in it:
        pred = predict(model, case.image, patch, overlap, amp=amp)
        row = {"id": case.id, **case_metrics(pred.numpy(), case.label[0].numpy(), case.spacing, min_component_voxels)}
        rows.append(row)
        if keep_predictions:
            preds.append(pred)
    return (rows, preds) if keep_predictions else rows


def configure_threads(value) -> int:
    """Set torch's CPU threads: an int, ``None`` (torch's default) or ``"auto"``: the default unless the machine is
    already busy (1-minute load average >= cores - 0.5), then 1 -- OpenMP threads competing with other processes
    for the same cores can make each step many times slower than one thread does. Returns the thread count."""
    import os

    if value in (None, "", 0):
        return torch.get_num_threads()
    if str(value).lower() == "auto":
        try:
            busy = os.getloadavg()[0] >= (os.cpu_count() or 1) - 0.5
        except OSError:
            busy = False
        if busy:
            torch.set_num_threads(1)
        return torch.get_num_threads()
    torch.set_num_threads(int(value))
    return int(value)
