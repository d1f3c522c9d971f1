"""Training and evaluation machinery shared by the recipes (``recipes/``, shipped as ``peft_tensor.recipes``) and
the benchmarks (``benchmarks/``).

The recipes are plain loops that compose these pieces; nothing here is a framework:
models and arms (:mod:`.models`, :mod:`.arms`), optimiser / schedule / loss / step / sliding-window evaluation
(:mod:`.loop`), metrics (:mod:`.metrics`), atomic checkpoints with exact resume (:mod:`.checkpoint`), torchrun
set-up (:mod:`.distributed`), logs (:mod:`.run_log`), plots (:mod:`.plots`), configs (:mod:`.config`)."""

from .arms import ARMS, apply_arm, canonical_arm, load_trained, param_counts, save_trained
from .checkpoint import Checkpointer, unwrap
from .config import apply_overrides, get_dotted, load_config
from .distributed import DistInfo, barrier, cleanup, init_distributed, wrap_ddp
from .run_log import RunLogger, write_json, write_rows_csv
from .loop import (Extremes, check_output_channels, evaluate_cases, make_loss, make_optimizer,
                   model_config_for_task, poly_scheduler, predict, set_seed, step_seed, train_step)
from .metrics import case_metrics, remove_small_components, summarize, summarize_per_class, task_case_metrics
from .models import build_model, defaults_for, load_backbone, save_backbone

__all__ = [
    "ARMS", "Checkpointer", "DistInfo", "Extremes", "RunLogger", "apply_arm", "apply_overrides", "barrier",
    "build_model", "canonical_arm", "case_metrics", "check_output_channels", "cleanup", "defaults_for",
    "evaluate_cases", "get_dotted", "init_distributed", "load_backbone", "load_trained", "load_config", "make_loss",
    "make_optimizer", "model_config_for_task", "param_counts", "poly_scheduler", "predict",
    "remove_small_components", "save_backbone", "save_trained", "set_seed", "step_seed", "summarize",
    "summarize_per_class", "task_case_metrics", "train_step", "unwrap", "wrap_ddp", "write_json", "write_rows_csv",
]
