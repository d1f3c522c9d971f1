"""What the benchmark scripts share: paths, statistics, load average, /proc status, timing, machine and version info,
formatting, config loading, round-robin scheduling and writing a result's JSON + markdown.

Imported as ``benchmarks._common``. A script run as a file (``python benchmarks/efficiency.py``) first puts the
checkout's root on ``sys.path`` (three lines at its top), so the same plain import works both ways.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

MB = 1024 * 1024
BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
CONFIG_DIR = BENCH_DIR / "configs"
RESULTS_DIR = BENCH_DIR / "results"


# -- statistics and formatting ----------------------------------------------------------------------------------------
def median(xs):
    """``statistics.median``, None for no samples."""
    return statistics.median(xs) if xs else None


def middle(xs):
    """The upper middle of the sorted samples (the median for an odd count): what the matmul timings report."""
    return sorted(xs)[len(xs) // 2]


def ratio(a, b):
    """``a / b``, None where either is missing or ``b`` is 0."""
    return None if a is None or b in (None, 0) else a / b


def fmt(v, spec="{:.2f}", none="—"):
    """``spec.format(v)``, ``none`` for None."""
    return none if v is None else spec.format(v)


def shape_str(dims: Iterable) -> str:
    """``[2, 1, 64]`` -> ``2x1x64``."""
    return "x".join(map(str, dims))


# -- the machine ------------------------------------------------------------------------------------------------------
def gap_discriminates(gaps: list[float], arm_sd: float) -> Optional[bool]:
    """Whether paired gaps (arm a - arm b, one per seed) tell the arms apart: the mean gap above twice its own sd and
    twice the larger of the two arms' seed sd (``arm_sd``); ``None`` with fewer than two seeds."""
    if len(gaps) < 2:
        return None
    mean, sd = statistics.fmean(gaps), statistics.stdev(gaps)
    return mean > 2 * sd and mean > 2 * arm_sd


def arm_defaults(arm) -> Any:
    """What the code, not the arm's config, decides about a recipe arm: its method's registry defaults (rank, rates,
    weight decay) or PEFT LoRA's / PiSSA's registry rate; ``None`` for the other arms. Part of a benchmark's run key,
    so that a run resumed from an earlier summary was made with today's defaults."""
    from peft_tensor import registry
    from peft_tensor.training.arms import decoder_rate_factor

    cfg = {"name": arm} if isinstance(arm, str) else dict(arm)
    name = cfg.get("name")
    name = str(name)[:-5] if str(name).endswith("_full") else name
    # the rate's factor with the decoder training, only where it applies: the other arms' run keys stay as they were
    rate_factor = decoder_rate_factor(cfg) if "method_lr" not in cfg else 1.0
    factor = [{"decoder_rate_factor": rate_factor}] if rate_factor != 1.0 else []
    spec = registry.methods().get(name)
    if spec is not None:
        key = [dict(spec.arm_defaults), dict(spec.full_arm_defaults or {}), spec.lr, spec.full_lr, spec.weight_decay]
        if spec.lr_by:  # only where set: the other methods' run keys stay as they were
            key.append({k: dict(v) for k, v in spec.lr_by.items()})
        if spec.backbone_arm_defaults:  # likewise
            key.append({"backbone": {k: dict(v) for k, v in spec.backbone_arm_defaults.items()}})
        return key + factor
    rate = registry.BASELINE_LR.get(name)
    return [rate, *factor] if rate is not None and factor else rate


def load_average() -> list[float]:
    """1/5/15-minute load average rounded to 2 digits ([] where the platform has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def proc_status_kb(field: str) -> Optional[int]:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), None where unreadable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) to the current RSS (Linux >= 4.0); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else ``platform.processor()`` or the architecture. It belongs in every
    result: two CPUs with different kernels (MKL, oneDNN) round differently, so one pretraining config gives weights
    that differ in their last bits, and every run from them differs too."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    """``<CPU model>, <n> cores``: the one-line machine description of the fewshot, loader and panel results."""
    return f"{cpu_model()}, {os.cpu_count()} cores"


def machine_info(threads: int) -> dict:
    """CPU model, cores, torch threads, platform, Python, memory and GPU (the efficiency / ViT-blocks results)."""
    import torch

    cpu = cpu_model()
    info = {"cpu": cpu, "logical_cores": os.cpu_count(), "torch_threads": threads, "platform": platform.platform(),
            "python": platform.python_version()}
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024 ** 3, 1)
    except (ValueError, OSError):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict:
    """torch, peft, transformers, monai and peft_tensor versions, and the checkout's short commit."""
    import monai
    import peft
    import torch
    import transformers

    import peft_tensor

    out = {"torch": torch.__version__, "peft": peft.__version__, "transformers": transformers.__version__,
           "monai": monai.__version__, "peft_tensor": peft_tensor.__version__}
    out["git_commit"] = short_commit(BENCH_DIR)
    return out


def short_commit(path) -> Optional[str]:
    """The short commit checked out at ``path`` (a checkout or a git worktree), ``None`` outside git."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=path,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# -- timing -----------------------------------------------------------------------------------------------------------
class Stopwatch:
    """Wall clock (``perf_counter``) and process CPU time (``process_time``, all threads) since construction."""

    def __init__(self) -> None:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

    def wall(self) -> float:
        return time.perf_counter() - self.wall0

    def elapsed(self) -> tuple[float, float]:
        """(wall s, CPU s)."""
        return time.perf_counter() - self.wall0, time.process_time() - self.cpu0


def round_robin(names: list[str], call: Callable[[str], Any], rounds: int, warmup: int,
                on_round: Optional[Callable[[int], None]] = None) -> dict[str, list]:
    """``rounds`` rounds; in each, ``call(name)`` once per name, starting one position later each round (so whatever
    else runs on the machine slows every arm alike). Returns each name's results of the rounds after ``warmup``;
    ``on_round(i)`` after round ``i``."""
    samples: dict[str, list] = {n: [] for n in names}
    for i in range(rounds):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            r = call(n)
            if i >= warmup:
                samples[n].append(r)
        if on_round is not None:
            on_round(i)
    return samples


# -- arms -------------------------------------------------------------------------------------------------------------
def method_of(arm: dict) -> str:
    """An arm's method: ``floor`` or the recipes' canonical arm name."""
    from peft_tensor.training.arms import canonical_arm

    return "floor" if arm["name"] == "floor" else canonical_arm(arm["name"])


def unique_params(model):
    """``model``'s parameters, each tensor once (tuner-level shared tensors counted once)."""
    seen = set()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            yield p


# -- configs, command line and outputs --------------------------------------------------------------------------------
def load_bench_config(name: str, overrides: Optional[list] = None) -> dict:
    """The recipes' config reader, names looked up in ``benchmarks/configs/`` first."""
    from peft_tensor.training.config import load_config

    return load_config(name, overrides or [], search=[CONFIG_DIR])


def default_config(prefix: str) -> str:
    """``<prefix>_gpu`` where CUDA is present, else ``<prefix>_cpu``."""
    import torch

    return f"{prefix}_gpu" if torch.cuda.is_available() else f"{prefix}_cpu"


def add_config_args(parser) -> None:
    """``--config`` and the ``dotted.key=value`` overrides of the config-driven benchmarks."""
    parser.add_argument("--config", help="YAML path or a name in benchmarks/configs (default: CPU or GPU config)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value (YAML value), e.g. run.steps=3")


def write_result(result: dict, out_dir, stem: str, markdown: Callable[[dict], str]) -> tuple[Path, Path]:
    """``<out_dir>/<stem>.json`` (indented, non-JSON values as ``str``) and ``<stem>.md`` (``markdown(result)``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    js.write_text(json.dumps(result, indent=2, default=str) + "\n")
    md.write_text(markdown(result))
    return js, md


def print_written(js: Path, md: Path) -> None:
    """The table on stdout, the two paths on stderr."""
    print(md.read_text())
    print(f"wrote {js} and {md}", file=sys.stderr)
