"""Data loading at scale (issue 11, section 4): loader throughput against training-step consumption, and peak
memory, for a synthetic NIfTI folder of many cases.

1. writes ``synthetic.n_cases`` image/mask pairs (``<id>_img.nii.gz`` int16, ``<id>_mask.nii.gz`` uint8, size
   ``synthetic.size`` voxels) to ``data_dir`` (once; reused when present);
2. for each dataset class (``dataset`` / ``cache`` / ``persistent``, see :mod:`peft_tensor.data.datasets`) and each
   worker count, in a fresh process: builds the case source exactly as the recipes do (``prepare_s``: the in-memory
   cache fill for ``cache``; for ``persistent`` the disk cache in ``work_dir`` is filled by its first row and read
   back by the later ones; nothing for ``dataset``), then times ``measure.batches`` training batches from
   :func:`peft_tensor.data.train_loader` (random crop ``patch`` + flips + intensity augmentation, batch
   ``batch_size``) -> cases/s, and samples the memory of the process and its workers every 0.1 s -> peak RSS (sum
   over processes) and peak PSS (shared pages counted once: forked workers share the cached cases);
3. times training steps of the models in ``models`` on the same batch shape on this CPU (wall and CPU time) ->
   the cases/s a training loop consumes.

Results: ``<output_dir>/<stem>.json`` and a markdown table ``<stem>.md``. CPU numbers on a shared machine depend on
its load: the load average is recorded before and after.

    nice -n 10 python benchmarks/loader_throughput.py --config loader_cpu
    python benchmarks/loader_throughput.py --config loader_cpu synthetic.n_cases=20 measure.batches=5   # a quick look
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python benchmarks/<script>.py): the checkout's root, for _common
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks._common import CONFIG_DIR, REPO, Stopwatch, load_average, load_bench_config, machine_line


# ---------------------------------------------------------------- synthetic data
def write_synthetic(folder: Path, n_cases: int, size, spacing: float, seed: int) -> Path:
    """``n_cases`` pairs of a brain-like int16 image with two ellipsoid structures and their uint8 mask (codes 1, 2).
    Written atomically, skipped when present."""
    import nibabel as nib

    from peft_tensor._atomic import atomic_write

    folder.mkdir(parents=True, exist_ok=True)
    size = tuple(int(s) for s in size)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in size], indexing="ij"), -1)
    centre = np.array(size, np.float32) / 2
    aff = np.diag([spacing, spacing, spacing, 1.0])
    for i in range(n_cases):
        img_path, mask_path = folder / f"case{i:04d}_img.nii.gz", folder / f"case{i:04d}_mask.nii.gz"
        if img_path.is_file() and mask_path.is_file():
            continue
        rng = np.random.default_rng((seed, i))
        brain = (((grid - centre) / (np.array(size) * 0.42)) ** 2).sum(-1) <= 1
        image = np.where(brain, 600.0, 0.0).astype(np.float32)
        mask = np.zeros(size, np.uint8)
        for code in (1, 2):
            c = centre + rng.uniform(-0.15, 0.15, 3) * np.array(size)
            radii = np.array(size) * rng.uniform(0.06, 0.12, 3)
            inside = (((grid - c) / radii) ** 2).sum(-1) <= 1
            mask[inside] = code
            image[inside] = 900.0 + 100 * code
        image += rng.normal(0, 30, size).astype(np.float32) * brain
        for path, data, dtype in ((img_path, image.astype(np.int16), np.int16), (mask_path, mask, np.uint8)):
            nii = nib.Nifti1Image(data, aff)
            nii.header.set_data_dtype(dtype)
            atomic_write(path, lambda tmp, nii=nii: nib.save(nii, tmp))
    return folder


# ---------------------------------------------------------------- memory sampling
class MemorySampler(threading.Thread):
    """Peak RSS and PSS summed over this process and its children, sampled every ``interval`` seconds."""

    def __init__(self, interval: float = 0.1):
        super().__init__(daemon=True)
        import psutil

        self.proc, self.interval = psutil.Process(), interval
        self.peak_rss = self.peak_pss = 0
        self.max_procs = 1
        self._halt = threading.Event()

    def sample(self):
        import psutil

        procs = [self.proc] + self.proc.children(recursive=True)
        rss = pss = 0
        for p in procs:
            try:
                info = p.memory_full_info()
                rss, pss = rss + info.rss, pss + getattr(info, "pss", info.rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        self.max_procs = max(self.max_procs, len(procs))

    def run(self):
        while not self._halt.is_set():
            self.sample()
            time.sleep(self.interval)

    def stop(self):
        self._halt.set()
        self.join()
        self.sample()


# ---------------------------------------------------------------- one loader measurement (own process)
def measure_loader(cfg: dict, dataset: str, workers: int) -> dict:
    import torch

    from peft_tensor.data import LoaderSettings, load_dataset, train_loader
    from peft_tensor.data.datasets import CaseSource
    from peft_tensor.data.transforms import augmentation

    torch.set_num_threads(1)
    sampler = MemorySampler()
    sampler.start()
    patch, batch, m = tuple(cfg["patch"]), int(cfg["batch_size"]), cfg["measure"]
    data = load_dataset({"kind": "pairs", "root": cfg["data_dir"], "task_type": "multiclass",
                         "classes": {"a": [1], "b": [2]}, "fractions": {"train": 1.0}})
    settings = LoaderSettings(dataset=dataset, cache_rate=float(cfg.get("cache_rate", 1.0)), num_workers=workers,
                              cache_dir=str(Path(cfg["work_dir"]) / "persistent"))
    watch = Stopwatch()
    source = CaseSource.from_settings(data["train"], data.task, cfg.get("preprocess"), patch, settings)
    if dataset == "persistent":  # fill the disk cache once, as the first epoch of a real run would
        for i in range(len(source)):
            source.dataset[i]
    prepare_s, prepare_cpu = watch.elapsed()
    warm, n = int(m.get("warmup_batches", 2)), int(m["batches"])
    loader = train_loader(source, 0, batch, augmentation(patch), 0, warm + n, settings=settings)
    it = iter(loader)
    for _ in range(warm):
        next(it)
    watch = Stopwatch()
    for _ in range(n):
        x, y = next(it)
    wall, cpu_main = watch.elapsed()
    del it, loader
    sampler.stop()
    import resource

    return {"dataset": dataset, "workers": workers, "cases": len(source), "prepare_s": prepare_s,
            "prepare_cpu_s": prepare_cpu, "batches": n, "batch_size": batch, "wall_s": wall,
            "cases_per_s": n * batch / wall, "main_cpu_s": cpu_main, "peak_rss_mb": sampler.peak_rss / 2**20,
            "peak_pss_mb": sampler.peak_pss / 2**20, "main_maxrss_mb": resource.getrusage(
                resource.RUSAGE_SELF).ru_maxrss / 1024, "processes": sampler.max_procs,
            "batch_shape": [list(x.shape), list(y.shape)]}


def run_isolated(config_path: Path, overrides: list, dataset: str, workers: int) -> dict:
    """``measure_loader`` in a fresh Python process (its peak memory is its own)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--config", str(config_path), *overrides,
           f"_one={dataset}:{workers}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{dataset}/{workers} workers failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- training-step consumption
def measure_steps(cfg: dict) -> list:
    import torch

    from peft_tensor.training import build_model, make_loss, make_optimizer
    from peft_tensor.training.loop import train_step
    from peft_tensor.data import make_task

    task = make_task("multiclass", {"a": [1], "b": [2]})
    patch, batch = tuple(cfg["patch"]), int(cfg["batch_size"])
    out = []
    for name, spec in cfg["models"].items():
        torch.manual_seed(0)
        model = build_model({**spec["model"], "out_channels": task.out_channels})
        opt = make_optimizer(model, {"lr": 1e-4})
        loss_fn = make_loss("dice", task)
        x = torch.randn(batch, 1, *patch)
        y = torch.randint(0, 3, (batch, 1, *patch))
        for _ in range(int(spec.get("warmup", 1))):
            train_step(model, x, y, loss_fn, opt)
        steps = int(spec.get("steps", 3))
        watch = Stopwatch()
        for _ in range(steps):
            train_step(model, x, y, loss_fn, opt)
        wall, cpu = (t / steps for t in watch.elapsed())
        out.append({"model": name, "params": sum(p.numel() for p in model.parameters()), "threads":
                    torch.get_num_threads(), "step_wall_s": wall, "step_cpu_s": cpu, "cases_per_s": batch / wall})
    return out


# ---------------------------------------------------------------- report
def markdown(result: dict) -> str:
    c = result["config"]
    lines = [f"Loader throughput, {result['n_cases']} synthetic cases of {'x'.join(map(str, c['synthetic']['size']))} "
             f"voxels (int16 NIfTI, gz), random {'x'.join(map(str, c['patch']))} crops + flips + intensity, "
             f"batch {c['batch_size']}; {result['machine']}, load average {result['load_before']} before, "
             f"{result['load_after']} after (shared machine)", "",
             "| dataset | workers | prepare (s) | cases/s | peak RSS (MB, all procs) | peak PSS (MB) | processes |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["loader"]:
        lines.append(f"| {r['dataset']} | {r['workers']} | {r['prepare_s']:.1f} | {r['cases_per_s']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['peak_pss_mb']:.0f} | {r['processes']} |")
    lines += ["", "Training-step consumption on this CPU (same batch shape, random data):", "",
              "| model | parameters | threads | step wall (s) | step CPU (s) | cases/s consumed |",
              "|---|---:|---:|---:|---:|---:|"]
    for s in result["steps"]:
        lines.append(f"| {s['model']} | {s['params']:,} | {s['threads']} | {s['step_wall_s']:.2f} | "
                     f"{s['step_cpu_s']:.2f} | {s['cases_per_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    from peft_tensor.training.config import config_path
    from peft_tensor.training.run_log import write_json

    args = list(sys.argv[1:] if argv is None else argv)
    one = next((a.split("=", 1)[1] for a in args if a.startswith("_one=")), None)
    args = [a for a in args if not a.startswith("_one=")]
    name = args[args.index("--config") + 1] if "--config" in args else "loader_cpu"
    overrides = [a for i, a in enumerate(args) if a != "--config" and (i == 0 or args[i - 1] != "--config")]
    cfg = load_bench_config(name, overrides)
    if one is not None:  # a worker process of run_isolated
        dataset, workers = one.split(":")
        print(json.dumps(measure_loader(cfg, dataset, int(workers))))
        return {}

    load_before = load_average()
    s = cfg["synthetic"]
    watch = Stopwatch()
    write_synthetic(Path(cfg["data_dir"]), int(s["n_cases"]), s["size"], float(s["spacing"]), int(s["seed"]))
    print(f"synthetic data in {cfg['data_dir']} ({watch.wall():.0f} s)", flush=True)
    path = config_path(name, [CONFIG_DIR])
    loader = []
    for dataset in cfg["datasets"]:
        for workers in cfg["workers"]:
            r = run_isolated(path, overrides, dataset, int(workers))
            print(json.dumps(r), flush=True)
            loader.append(r)
    steps = measure_steps(cfg)
    for r in steps:
        print(json.dumps(r), flush=True)
    import torch

    result = {"config": cfg, "n_cases": int(s["n_cases"]), "loader": loader, "steps": steps,
              "machine": machine_line(), "torch": torch.__version__, "load_before": load_before,
              "load_after": load_average()}
    out = Path(cfg["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{cfg['stem']}.json", result)
    (out / f"{cfg['stem']}.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
