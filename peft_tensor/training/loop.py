"""The training loop of the recipes (:func:`train_loop`, shared by ``pretrain`` and ``finetune``) and its pieces:
optimiser, schedule, loss, one step, sliding-window evaluation, seeding."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.labels import as_task
from ..data.transforms import seed_for
from .metrics import task_case_metrics


def set_seed(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs through MONAI's ``set_determinism`` (which also asks cuDNN for
    deterministic convolution algorithms and turns its autotuner off). It leaves
    ``torch.use_deterministic_algorithms`` as it is: on CPU every arm's forward and backward passes under it but
    gains nothing (the CPU kernels already give the same result for a fixed thread count), and on CUDA it would make
    cuBLAS refuse to run without ``CUBLAS_WORKSPACE_CONFIG``. MONAI's random transforms keep their own states: the
    recipes seed them per sample (:func:`peft_tensor.data.transforms.draw_sample`)."""
    from monai.utils import set_determinism

    set_determinism(seed=int(seed))


def step_seed(seed: int, step: int, rank: int = 0) -> None:
    """Seed torch's RNG (dropout) from (seed, step, rank): a resumed run draws the same dropout masks."""
    torch.manual_seed(seed_for(seed, "torch", step, rank))


def make_optimizer(model: torch.nn.Module, cfg: dict) -> torch.optim.Optimizer:
    """Adam (amsgrad) as in the papers: ``lr`` 1e-3, ``weight_decay`` 2e-5. ``method_lr`` (optional) is the
    learning rate of the adapter factors, the decoder/head (``modules_to_save``) keep ``lr``; ``method_weight_decay``
    (optional, with ``method_lr``) their weight decay. ``cfg`` is an
    ``optim`` block (:class:`~peft_tensor.training.schema.OptimConfig`: its defaults fill the keys left out)."""
    from .schema import OptimConfig, fill_block

    cfg = fill_block(OptimConfig, cfg, "optim")
    lr = float(cfg["lr"])
    wd = float(cfg["weight_decay"])
    method_lr = cfg["method_lr"]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameter")
    if method_lr is None:
        groups = [{"params": [p for _, p in named], "lr": lr}]
    else:
        dec = [p for n, p in named if "modules_to_save" in n]
        ada = [p for n, p in named if "modules_to_save" not in n]
        ada_wd = wd if cfg["method_weight_decay"] is None else float(cfg["method_weight_decay"])
        groups = [g for g in ({"params": dec, "lr": lr, "weight_decay": wd},
                              {"params": ada, "lr": float(method_lr), "weight_decay": ada_wd}) if g["params"]]
    name = str(cfg["name"]).lower()
    if name == "sgd":  # for checks that must not be amplified by Adam's normalisation (e.g. DDP equivalence)
        return torch.optim.SGD(groups, lr=lr, weight_decay=wd, momentum=float(cfg["momentum"]))
    if name != "adam":
        raise ValueError(f"unknown optimiser {name!r}: use 'adam' (the papers) or 'sgd'")
    return torch.optim.Adam(groups, lr=lr, weight_decay=wd, amsgrad=bool(cfg["amsgrad"]))


def poly_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, power: float = 0.9):
    """Polynomial decay ``(1 - step / total) ** power`` (the papers' schedule, stepped per iteration)."""
    total = max(int(total_steps), 1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / total) ** power)


def make_loss(name: str = "dice", task=None):
    """MONAI losses. ``dice``: soft Dice over every channel (background included for softmax tasks, as the papers);
    ``dicece``: Dice + cross-entropy. Softmax tasks (binary, multi-class; labels [B, 1, ...] class indices):
    ``to_onehot_y`` + softmax; multi-label tasks (labels [B, K, ...] binary channels): one sigmoid per channel and
    binary cross-entropy."""
    from monai.losses import DiceCELoss, DiceLoss

    softmax = as_task(task).softmax
    kw = dict(to_onehot_y=True, softmax=True, include_background=True) if softmax else dict(sigmoid=True)
    name = str(name).lower()
    if name == "dice":
        return DiceLoss(**kw)
    if name in ("dicece", "dice_ce"):
        return DiceCELoss(**kw)
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
        logits = model(images.to(device, non_blocking=True))
    loss = loss_fn(logits.float(), labels.to(device, non_blocking=True))
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return float(loss.detach())


@torch.no_grad()
def predict(model, image: torch.Tensor, patch, overlap: float = 0.5, sw_batch_size: int = 4, amp: bool = False,
            task=None):
    """Prediction of one preprocessed image [C, X, Y, Z] by MONAI's sliding-window inference.

    ``task=None`` (binary, older API): the foreground mask [X, Y, Z] (bool). With a task: the class-index map
    [X, Y, Z] (uint8, argmax over background + classes) for softmax tasks, K region masks [K, X, Y, Z] (bool,
    sigmoid > 0.5) for multi-label ones."""
    from monai.inferers import sliding_window_inference

    device = next(p for p in model.parameters()).device
    model.eval()
    with autocast(device, amp):
        logits = sliding_window_inference(image[None].to(device), tuple(patch), sw_batch_size, model,
                                          overlap=overlap, mode="gaussian")
    logits = torch.as_tensor(logits).float()[0]
    if task is None:
        return (logits.argmax(0) == 1).cpu()
    task = as_task(task)
    if logits.shape[0] != task.out_channels:
        raise ValueError(f"the network outputs {logits.shape[0]} channels, the {task.describe()} task needs "
                         f"{task.out_channels}: set model.out_channels={task.out_channels}")
    if task.softmax:
        return logits.argmax(0).to(torch.uint8).cpu()
    return (torch.sigmoid(logits) > 0.5).cpu()



@dataclass
class TrainRun:
    """What :func:`train_loop` leaves: the step count, the run log (its rows feed the curves), the training time,
    and ``interrupted_at`` (the step a ``train.stop_after`` interruption stopped at, else None)."""

    steps: int
    log: "RunLogger"  # noqa: F821 - peft_tensor.training.run_log.RunLogger
    train_s: float = 0.0
    interrupted_at: int | None = None


def train_loop(model, cfg: dict, optim_cfg: dict, train_cases, val_cases, task, patch, loader_cfg, dist,
               out: Path, desc: str) -> TrainRun:
    """The recipes' training loop: ``train.steps`` (or epochs) steps of ``optim_cfg``'s optimiser with the poly
    schedule and ``train.loss``, batches drawn per step in DataLoader workers, resumed from
    ``out/checkpoint`` and checkpointed every ``train.checkpoint_every`` steps, one ``metrics`` row per step (loss,
    lr, time, and the validation Dice every ``train.val_every`` steps). ``cfg`` is the recipe's filled config
    (``seed``, ``progress``, ``train``). It stops early at ``train.stop_after`` (a simulated interruption) without
    cleaning up the process group: the caller does."""
    from tqdm.auto import tqdm

    from ..data import train_loader
    from ..data.transforms import augmentation
    from .checkpoint import Checkpointer
    from .config import total_steps
    from .distributed import all_mean, barrier, wrap_ddp
    from .metrics import summarize
    from .run_log import RunLogger

    from .schema import OptimConfig, config_block, fill_block

    seed, train_cfg, optim_cfg = int(cfg["seed"]), cfg["train"], fill_block(OptimConfig, optim_cfg, "optim")
    with config_block("train"):
        steps = total_steps(train_cfg, len(train_cases))
    with config_block("optim"):
        optimizer = make_optimizer(model, optim_cfg)
        scheduler = poly_scheduler(optimizer, steps, float(optim_cfg["poly_power"]))
    with config_block("train"):
        loss_fn = make_loss(train_cfg["loss"], task)

    # resume where an interrupted run stopped
    ckpt = Checkpointer(out / "checkpoint", train_cfg["checkpoint_every"], enabled=dist.is_main)
    start, _ = ckpt.resume(model, optimizer, scheduler)
    log = RunLogger(out, enabled=dist.is_main)
    log.truncate(start)
    ddp_model = wrap_ddp(model, dist)
    aug = augmentation(patch, float(train_cfg["crop_pos"]), float(train_cfg["crop_neg"]), train_cfg["crop"])
    batch, amp = int(train_cfg["batch_size"]), bool(train_cfg["amp"])
    val_every, stop_after = int(train_cfg["val_every"]), train_cfg["stop_after"]

    # batches of steps start..steps-1, cropped and augmented in DataLoader workers (the same for any worker count)
    batches = iter(train_loader(train_cases, seed, batch, aug, start, steps, dist.rank, dist.world_size, loader_cfg,
                                dist.device, task.softmax))
    bar = tqdm(range(start, steps), desc=desc, disable=not (dist.is_main and cfg["progress"]))
    t0 = time.time()
    for step in bar:
        step_seed(seed, step, dist.rank)
        images, labels = next(batches)
        loss = all_mean(train_step(ddp_model, images, labels, loss_fn, optimizer, scheduler, amp), dist)
        row = {"step": step, "loss": loss, "lr": scheduler.get_last_lr()[0], "time_s": time.time() - t0}
        if val_every and (step + 1) % val_every == 0 and val_cases and dist.is_main:
            row["val_dice"] = summarize(evaluate_cases(model, val_cases, patch, amp=amp, task=task))["dice"]["mean"]
        log.log(**row)
        bar.set_postfix(loss=f"{loss:.3f}")
        if ckpt.due(step):
            ckpt.save(step + 1, model, optimizer, scheduler)
            barrier(dist)
        if stop_after is not None and step + 1 >= int(stop_after):  # simulated interruption (tests)
            return TrainRun(steps, log, time.time() - t0, interrupted_at=step + 1)
    return TrainRun(steps, log, time.time() - t0)


class Extremes:
    """The best and the worst case by (mean) Dice seen so far, with their predictions: what the overlays show,
    without keeping every prediction of a large test set."""

    def __init__(self):
        self.best = self.worst = None  # (dice, case, prediction, row)

    def add(self, case, pred, row) -> None:
        d = row.get("dice", float("nan"))
        d = -1.0 if d != d else d
        if self.best is None or d > self.best[0]:
            self.best = (d, case, pred, row)
        if self.worst is None or d < self.worst[0]:
            self.worst = (d, case, pred, row)

    def items(self) -> list:
        """``[("worst", case, pred, row), ("best", ...)]`` (empty when no case was seen)."""
        if self.best is None:
            return []
        return [("worst", *self.worst[1:]), ("best", *self.best[1:])]


def evaluate_cases(model, cases, patch, overlap: float = 0.5, min_component_voxels: int = 0,
                   amp: bool = False, keep_predictions: bool = False, progress: bool = False, task=None,
                   extremes: Extremes | None = None, num_workers: int = 0):
    """Per-case metrics of ``model`` on ``cases`` (a list of :class:`peft_tensor.data.Case` or a lazily loading
    :class:`peft_tensor.data.CaseSource`, read ``num_workers`` ahead in worker processes).

    Rows: :func:`peft_tensor.training.metrics.task_case_metrics` plus ``id`` (per class and the mean over classes
    for several classes). Returns the rows, and the predictions too if ``keep_predictions`` (small sets only);
    ``extremes`` collects the best and worst case for the overlays."""
    from ..data.datasets import iterate_cases

    task = as_task(task)
    rows, preds = [], []
    it = iterate_cases(cases, num_workers)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=len(cases), desc="evaluate", unit="case", leave=False)
    for case in it:
        pred = predict(model, case.image, patch, overlap, amp=amp, task=task)
        row = {"id": case.id, **task_case_metrics(task.masks(pred), task.masks(case.label), task.classes,
                                                  case.spacing, min_component_voxels)}
        rows.append(row)
        if keep_predictions:
            preds.append(pred)
        if extremes is not None:
            extremes.add(case, pred, row)
    return (rows, preds) if keep_predictions else rows


def model_config_for_task(model_cfg: dict, task) -> dict:
    """``model_cfg`` with ``out_channels`` the task needs: filled in when absent (networks by ``name``; a
    ``_target_`` class may call it otherwise, its built head is checked by :func:`check_output_channels`), a clear
    error when it disagrees."""
    task = as_task(task)
    cfg = dict(model_cfg)
    have = cfg.get("out_channels")
    if have is None:
        if "_target_" not in cfg:
            cfg["out_channels"] = task.out_channels
    elif int(have) != task.out_channels:
        raise ValueError(_channels_message(task, f"model.out_channels is {int(have)}"))
    return cfg


def output_channels(model: torch.nn.Module) -> int | None:
    """The output channels of a segmentation network: its ``out_channels`` attribute, else those of its last
    convolution (MONAI's UNETR / SwinUNETR / UNet heads), else ``None`` (unknown)."""
    for m in (model, getattr(model, "base_model", None), getattr(getattr(model, "base_model", None), "model", None)):
        if m is not None and isinstance(getattr(m, "out_channels", None), int):
            return int(m.out_channels)
    last = None
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose3d)):
            last = m
    return int(last.out_channels) if last is not None else None


def check_output_channels(model: torch.nn.Module, task) -> None:
    """A clear error when the network's output channels do not fit the task (found from its head)."""
    task = as_task(task)
    have = output_channels(model)
    if have is not None and have != task.out_channels:
        raise ValueError(_channels_message(task, f"the network has {have} output channels"))


def _channels_message(task, what: str) -> str:
    k = len(task.classes)
    need = ("background + " if task.softmax else "") + f"{k} class{'es' if k > 1 else ''}"
    return (f"{what}, but the data is a {task.describe()} task that needs "
            f"{task.out_channels} ({need}): set model.out_channels={task.out_channels}, or change data.task_type / "
            "data.classes")


_STARTUP_THREADS = torch.get_num_threads()  # torch's default for this process (cores or OMP_NUM_THREADS)


def configure_threads(value) -> int:
    """Set torch's CPU threads and return the count now in use: an int; ``None`` (leave torch's current setting);
    or ``"auto"``: torch's default for the process unless the machine is already busy (1-minute load average >=
    cores - 0.5), then 1 -- OpenMP threads competing with other processes for the same cores can make each step many
    times slower than one thread does.

    The count decides how the CPU kernels split their reductions, so runs with other counts give other weights: a
    recipe writes the count this returns into its run's ``config.json`` (:func:`start_run`), so that rerunning that
    config repeats it."""
    import os

    if value in (None, "", 0):
        return torch.get_num_threads()
    if str(value).lower() == "auto":
        try:
            busy = os.getloadavg()[0] >= (os.cpu_count() or 1) - 0.5
        except OSError:
            busy = False
        torch.set_num_threads(1 if busy else _STARTUP_THREADS)
        return torch.get_num_threads()
    if isinstance(value, str) and not value.strip().isdigit():
        raise ValueError(f"threads must be auto, null or a thread count, got {value!r}")
    torch.set_num_threads(int(value))
    return torch.get_num_threads()


def run_threads(value, dist) -> int:
    """:func:`configure_threads` for every process of a run: the main process resolves ``value`` (``auto`` looks at
    the machine's load) and the others take its count, so that no process splits its reductions differently."""
    count = configure_threads(value)
    if getattr(dist, "enabled", False):
        import torch.distributed as tdist

        box = [count]
        tdist.broadcast_object_list(box, src=0)
        count = configure_threads(int(box[0]))
    return count


@dataclass
class RunStart:
    """What every recipe run begins with: the process group, the run folder, the seed and patch, and the data."""

    dist: object
    out: Path
    seed: int
    patch: tuple
    data: object
    task: object
    sources: dict
    loader_cfg: dict


def start_run(cfg: dict) -> RunStart:
    """Start a recipe run from its validated config: distributed set-up, seed, torch threads (``cfg["threads"]`` is
    replaced by the count in use), the run folder with its ``config.json`` (main process; the config as run, so
    ``--config <run>/config.json`` reruns it), then the dataset (built once, by the main process first) and its
    case sources per split (``train``, ``val``, ``test``) with the loader settings."""
    from ..data import load_dataset
    from ..data.datasets import case_sources
    from .config import patch_size
    from .distributed import init_distributed, main_process_first
    from .run_log import write_json
    from .schema import config_block

    with config_block("device"):  # a failure below is reported as one line naming its config block
        dist = init_distributed(cfg["device"])
    out = Path(cfg["output_dir"])
    seed, patch = int(cfg["seed"]), patch_size(cfg)
    set_seed(seed)
    # the thread count in use goes into the run's config: `threads: auto` is resolved here, once, and a rerun of
    # the saved config.json repeats it (other counts split the CPU reductions differently: other weights)
    with config_block("threads"):
        cfg["threads"] = run_threads(cfg["threads"], dist)
    if dist.is_main:
        with config_block("output_dir"):
            out.mkdir(parents=True, exist_ok=True)
            write_json(out / "config.json", cfg)
    with config_block("data"):
        data = main_process_first(dist, load_dataset, cfg["data"])  # builds the embedded cohort once
        sources, loader_cfg = case_sources(data, cfg["data"], patch, out)
    return RunStart(dist, out, seed, patch, data, data.task, sources, loader_cfg)
