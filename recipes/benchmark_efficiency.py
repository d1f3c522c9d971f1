"""Efficiency benchmark: our tensor PEFT methods against PEFT LoRA / PiSSA, full and decoder-only fine-tuning.

Per arm and backbone: trainable parameters, adapter file size, set-up time (``get_peft_model`` including the
decompositions), median training-step time (wall and process CPU time), peak memory during training, and
inference after ``merge_and_unload`` against the base network. Every arm runs in its own worker process (its
peak memory is its own); the training steps of all arms of a backbone are interleaved round-robin so that other
load on the machine hits every arm alike. Ratios are to PEFT LoRA r=8 (and, for inference, to the base network).
How each quantity is measured: :mod:`peft_tensor.benchmark`.

    python recipes/benchmark_efficiency.py                                   # CPU config, or the GPU one on CUDA
    python recipes/benchmark_efficiency.py --config recipes/configs/benchmark_efficiency_cpu.yaml \
        run.steps=3 run.backbones=[unetr]
    python recipes/benchmark_efficiency.py --profile unetr:tcurlora          # torch.profiler table of one arm

Writes ``<output_dir>/<stem>.json`` and ``<stem>.md`` (default ``benchmarks/results/efficiency_{cpu,gpu}``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

try:
    import peft_tensor  # noqa: F401
except ImportError:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peft_tensor.benchmark import profile_arm, run_benchmark, write_outputs

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def load_config(path: str | None, overrides: list[str]) -> dict:
    if path is None:
        path = str(CONFIG_DIR / ("benchmark_efficiency_gpu.yaml" if torch.cuda.is_available()
                                 else "benchmark_efficiency_cpu.yaml"))
    elif not Path(path).is_file():
        path = str(CONFIG_DIR / f"{path.removesuffix('.yaml')}.yaml")
    cfg = yaml.safe_load(Path(path).read_text())
    for item in overrides:  # dotted.key=value, the value parsed as YAML
        key, _, value = item.partition("=")
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML path or a name in recipes/configs (default: CPU or GPU config)")
    parser.add_argument("--profile", metavar="BACKBONE:ARM", help="profile one arm's training steps and exit")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value (YAML value), e.g. run.steps=3")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    torch.set_num_threads(int(cfg["run"]["threads"]))

    if args.profile:
        backbone, arm = args.profile.split(":")
        print(profile_arm(cfg, backbone, arm))
        return

    result = run_benchmark(cfg, log=lambda msg: print(msg, flush=True))
    js, md = write_outputs(result, cfg["output_dir"], cfg.get("stem", "efficiency"))
    print(md.read_text())
    print(f"wrote {js} and {md}", file=sys.stderr)


if __name__ == "__main__":
    main()
