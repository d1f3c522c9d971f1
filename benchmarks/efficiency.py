"""Efficiency benchmark: our tensor PEFT methods against PEFT LoRA / PiSSA, full and decoder-only fine-tuning.

    python benchmarks/efficiency.py                                   # configs/efficiency_cpu.yaml (gpu on CUDA)
    python benchmarks/efficiency.py --config efficiency_cpu run.steps=3 run.backbones=[unetr]
    python benchmarks/efficiency.py --config efficiency_cpu run.backbones=[swinunetr]   # HyPS vs LoRA, SwinUNETR-48
    python benchmarks/efficiency.py --profile unetr:tcurlora          # torch.profiler table of one arm

Writes ``<output_dir>/<stem>.json`` and ``<stem>.md`` (default ``benchmarks/results/efficiency_{cpu,gpu}``).
Configs are read by the recipes' reader (:mod:`peft_tensor.training.config`, names looked up in
``benchmarks/configs/``); backbones and arms are built by the recipes' code (:func:`peft_tensor.training.build_model`,
:func:`peft_tensor.training.apply_arm`), so an arm here is the arm a user trains.

One *arm* is one way of fine-tuning a backbone (full, decoder only, floor, PEFT LoRA, PiSSA, and every method in
:mod:`peft_tensor.registry`). Each arm lives in its own worker process (:class:`ArmWorker`), so its peak memory is its
own; the parent drives all workers of a backbone **round-robin, one training step at a time**, so that whatever else
runs on the machine slows every arm alike. Per arm we record

* trainable parameters (tuner-level shared tensors counted once) and the adapter file size
  (``save_pretrained`` -> ``adapter_model.safetensors``; non-PEFT arms: their trainable weights as safetensors);
* set-up time: ``get_peft_model`` including every decomposition (wall and process CPU time);
* training-step time: zero_grad + forward + soft Dice + backward + Adam (amsgrad) step; median over the timed
  steps, wall clock and process CPU time (all threads; less sensitive to other processes than wall time);
* peak memory during training: process peak RSS (``VmHWM``, reset before the first step through
  ``/proc/self/clear_refs``) on CPU; ``max_memory_allocated`` / ``max_memory_reserved`` on CUDA;
* inference after ``merge_and_unload`` (``no_grad`` forward, eval mode) against the unchanged base network, which
  is the floor arm's network (nothing in it trains). Arms that cannot merge are timed unmerged and say so.

The *floor* arm trains nothing but makes the patch-embedding output require a gradient, so the backward pass runs
through the whole frozen encoder: the cost every encoder adapter pays at least. In the adapter arms the decoder is
frozen (the adapter-versus-adapter comparison); the decoder-inclusive count of the papers is reported beside it.

Workers can also run in-process (``isolate=False``: one process, arms one after the other, peak memory mixed),
which the smoke test uses.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing as mp
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):  # run as a file (python benchmarks/<script>.py): the checkout's root, for _common
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from peft import PeftModel

from benchmarks._common import (MB, Stopwatch, add_config_args, default_config, fmt, load_average,
                                load_bench_config, machine_info, median, method_of, print_written, proc_status_kb,
                                ratio, reset_peak_rss, round_robin, shape_str, unique_params, versions, write_result)
from peft_tensor.registry import methods
from peft_tensor.training.arms import FULL_SUFFIX, PEFT_ARMS, apply_arm, canonical_arm, name_matches, save_trained
from peft_tensor.training.models import build_model, defaults_for

__all__ = ["ArmWorker", "build_backbone", "make_arm", "run_benchmark", "machine_info", "versions", "markdown_report",
           "profile_arm", "target_checks", "write_outputs", "main"]

# The efficiency targets for our methods' arms, against the reference arm (PEFT LoRA r=8) and the base network.
TARGETS = {"step_vs_ref": 1.10, "memory_vs_ref": 1.10, "infer_vs_base_tolerance": 0.02, "setup_s": 5.0}


# -- backbones and arms: the recipes' code ----------------------------------------------------------------------------
def build_backbone(spec: dict, size: int, seed: int = 0) -> torch.nn.Module:
    """The recipes' :func:`~peft_tensor.training.build_model` of ``spec["model"]`` (UNETR: ``img_size`` = ``size``)."""
    torch.manual_seed(seed)
    return build_model({**spec["model"], "img_size": size})


def decoder_of(spec: dict) -> list[str]:
    """The backbone's decoder (``spec["decoder"]``, else the recipes' default for that backbone)."""
    return list(spec.get("decoder") or defaults_for(spec["model"])["decoder"])


def make_arm(model: torch.nn.Module, arm: dict, spec: dict) -> tuple[torch.nn.Module, dict]:
    """Prepare ``model`` for ``arm`` (``{"name": ..., "label": ..., **fields}``) with the recipes' :func:`apply_arm`.

    In the adapter arms the decoder is frozen (``modules_to_save=[]``: adapter against adapter) unless the arm
    says otherwise; ``decoder_only`` trains ``spec["decoder"]``. One arm exists only here: ``floor`` trains nothing
    but makes the output of ``spec["floor_module"]`` require a gradient, so backward runs through the frozen
    encoder. Returns (model, info)."""
    fields = {k: v for k, v in arm.items() if k != "label"}
    info: dict[str, Any] = {"peft": False}
    if fields["name"] == "floor":
        model.requires_grad_(False)
        hook_module = model.get_submodule(spec["floor_module"])
        # output of a frozen first layer is a leaf: asking for its gradient makes backward traverse the encoder
        info["hook"] = hook_module.register_forward_hook(
            lambda _m, _i, out: out.requires_grad_(True) if torch.is_grad_enabled() else out)
        return model, info
    name = canonical_arm(fields["name"])
    if name == "decoder_only":
        fields.setdefault("modules_to_save", decoder_of(spec))
    elif name.endswith(FULL_SUFFIX):
        pass  # whole-network arms: their own targets (encoder Linears + decoder convolutions) and the head
    elif name in PEFT_ARMS:
        fields.setdefault("modules_to_save", [])
        if spec.get("targets"):
            fields.setdefault("target_modules", list(spec["targets"]))
    model = apply_arm(model, fields, spec["model"])
    info["peft"] = isinstance(model, PeftModel)
    return model, info


# -- memory -----------------------------------------------------------------------------------------------------------
def _peak_rss_mb() -> float:
    hwm = proc_status_kb("VmHWM")
    if hwm is not None:
        return hwm / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    rss = proc_status_kb("VmRSS")
    return rss / 1024 if rss is not None else float("nan")


# -- one arm ----------------------------------------------------------------------------------------------------------
class ArmWorker:
    """One arm on one backbone. Methods are the commands the parent sends (in this order)."""

    def __init__(self, job: dict) -> None:
        self.job = job
        torch.set_num_threads(int(job["threads"]))
        self.device = torch.device(job["device"])
        spec, size, batch = job["backbone"], int(job["size"]), int(job["batch"])
        import peft  # noqa: F401 - imported before timing set-up
        import peft_tensor  # noqa: F401

        self.model = build_backbone(spec, size, seed=int(job.get("seed", 0))).to(self.device)
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(batch, spec["model"].get("in_channels", 1), size, size, size,
                             generator=gen).to(self.device)
        self.y = (torch.rand(batch, 1, size, size, size, generator=gen) > 0.9).float().to(self.device)
        from monai.losses import DiceLoss

        self.loss_fn = DiceLoss(to_onehot_y=True, softmax=True)
        self.opt = None
        self.info: dict = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def ready(self) -> dict:
        return {"rss_mb": _rss_mb(), "base_params": sum(p.numel() for p in self.model.parameters())}

    def setup(self) -> dict:
        arm, spec = self.job["arm"], self.job["backbone"]
        decoder_params = sum(p.numel() for n, p in self.model.named_parameters() if name_matches(n, decoder_of(spec)))
        self._sync()
        watch = Stopwatch()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model, self.info = make_arm(self.model, arm, spec)
        self._sync()
        setup_s, setup_cpu_s = watch.elapsed()
        params = [p for p in unique_params(self.model) if p.requires_grad]
        trainable = sum(p.numel() for p in params)
        self.opt = torch.optim.Adam(params, lr=1e-3, weight_decay=2e-5, amsgrad=True) if params else None
        return {"trainable": trainable, "decoder_params": decoder_params, "setup_s": setup_s,
                "trains_decoder": bool(arm.get("modules_to_save")),
                "setup_cpu_s": setup_cpu_s, "adapter_file_bytes": self._file_size(), "rss_after_setup_mb": _rss_mb()}

    def _file_size(self) -> Optional[int]:
        """Size of the weights file the recipes' :func:`save_trained` writes for this arm (0: nothing trains)."""
        if method_of(self.job["arm"]) == "floor" or not any(p.requires_grad for p in self.model.parameters()):
            return 0
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            save_trained(self.model, tmp, self.job["arm"]["name"])
            name = "adapter_model.safetensors" if self.info.get("peft") else "trainable.safetensors"
            return (Path(tmp) / name).stat().st_size

    def train_begin(self) -> dict:
        self.model.train()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        return {"rss_before_train_mb": _rss_mb(), "peak_reset": reset_peak_rss()}

    def step(self) -> dict:
        self._sync()
        watch = Stopwatch()
        if self.opt is not None:
            self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(self.x), self.y)
        loss.backward()
        if self.opt is not None:
            self.opt.step()
        self._sync()
        wall, cpu = watch.elapsed()
        return {"wall_s": wall, "cpu_s": cpu, "loss": loss.item()}

    def train_end(self) -> dict:
        out = {"peak_rss_mb": _peak_rss_mb()}
        if self.device.type == "cuda":
            out["max_allocated_mb"] = torch.cuda.max_memory_allocated(self.device) / MB
            out["max_reserved_mb"] = torch.cuda.max_memory_reserved(self.device) / MB
        return out

    def merge(self) -> dict:
        """``merge_and_unload`` where the arm is a PEFT model; drop training state; eval mode."""
        self.opt = None
        for p in self.model.parameters():
            p.grad = None
        hook = self.info.pop("hook", None)
        if hook is not None:
            hook.remove()
        out: dict[str, Any] = {"merged": False, "merge_s": None, "note": "plain network (no adapter)"}
        if self.info.get("peft"):
            self._sync()
            watch = Stopwatch()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self.model = self.model.merge_and_unload()
                self._sync()
                out.update(merged=True, merge_s=watch.wall(), note="merged")
            except Exception as err:  # noqa: BLE001 - reported, then timed unmerged
                out["note"] = f"cannot merge ({type(err).__name__}): timed unmerged"
        self.model.eval()
        return out

    def infer(self) -> dict:
        self._sync()
        watch = Stopwatch()
        with torch.no_grad():
            self.model(self.x)
        self._sync()
        wall, cpu = watch.elapsed()
        return {"wall_s": wall, "cpu_s": cpu}


def _worker_main(conn, job: dict) -> None:
    try:
        worker = ArmWorker(job)
        conn.send(("ok", worker.ready()))
    except Exception as err:  # noqa: BLE001
        conn.send(("error", f"{type(err).__name__}: {err}"))
        return
    while True:
        cmd = conn.recv()
        if cmd == "close":
            break
        try:
            conn.send(("ok", getattr(worker, cmd)()))
        except Exception as err:  # noqa: BLE001
            import traceback

            conn.send(("error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))


class _Remote:
    """An :class:`ArmWorker` in a child process (spawn), driven over a pipe."""

    def __init__(self, job: dict) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, job), daemon=True)
        self.proc.start()
        self._ready = None

    def wait_ready(self) -> dict:
        if self._ready is None:
            self._ready = self._recv()
        return self._ready

    def _recv(self) -> dict:
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(value)
        return value

    def call(self, cmd: str) -> dict:
        self.conn.send(cmd)
        return self._recv()

    def close(self) -> None:
        try:
            self.conn.send("close")
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()


class _Local:
    def __init__(self, job: dict) -> None:
        self.worker = ArmWorker(job)

    def wait_ready(self) -> dict:
        return self.worker.ready()

    def call(self, cmd: str) -> dict:
        return getattr(self.worker, cmd)()

    def close(self) -> None:
        self.worker = None


# -- the run ----------------------------------------------------------------------------------------------------------
def _round_robin(workers: dict, names: list[str], cmd: str, rounds: int, warmup: int, log) -> dict:
    """``rounds`` rounds; in each, every worker runs ``cmd`` once, starting one position later each round."""
    return round_robin(names, lambda n: workers[n].call(cmd), rounds, warmup,
                       on_round=lambda i: log(f"  {cmd} round {i + 1}/{rounds} done (load {load_average()})"))


def run_backbone(name: str, cfg: dict, log=print) -> dict:
    """All arms of one backbone: start workers, set up one at a time, train and infer round-robin."""
    spec = cfg["backbones"][name]
    run = cfg["run"]
    device = run.get("device", "auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    arms = dict(spec["arms"])
    if "floor" not in [method_of(a) for a in arms.values()]:
        raise ValueError("every backbone needs a 'floor' arm: its network is the base for the inference ratio")
    base_arm = next(n for n, a in arms.items() if method_of(a) == "floor")
    jobs = {n: {"backbone": spec, "arm": a, "size": run["size"], "batch": run["batch"], "threads": run["threads"],
                "device": device, "seed": run.get("seed", 0)} for n, a in arms.items()}
    make = _Remote if run.get("isolate", True) else _Local
    names = list(arms)
    res: dict[str, Any] = {"network": spec["model"]["name"], "model": spec["model"], "targets": spec.get("targets"),
                           "decoder": decoder_of(spec), "input": [run["batch"], 1, *[run["size"]] * 3],
                           "device": device, "base_arm": base_arm, "load_average": {}}
    workers: dict = {}
    try:
        log(f"[{name}] starting {len(names)} workers: {', '.join(names)}")
        for n in names:  # imports and model construction overlap; nothing is timed until every worker is ready
            workers[n] = make(jobs[n])
        for n in names:
            ready = workers[n].wait_ready()
        res["base_params"] = ready["base_params"]
        res["load_average"]["setup"] = load_average()
        per_arm = {n: {"method": method_of(arms[n]), "label": arms[n].get("label", n)} for n in names}
        for n in names:
            per_arm[n].update(workers[n].call("setup"))
            log(f"  setup {n}: {per_arm[n]['setup_s']:.2f} s, {per_arm[n]['trainable']:,} trainable")
        res["decoder_params"] = per_arm[base_arm]["decoder_params"]
        for n in names:
            per_arm[n].update(workers[n].call("train_begin"))
        res["load_average"]["train"] = load_average()
        warmup, steps = int(spec.get("warmup_steps", run["warmup_steps"])), int(spec.get("steps", run["steps"]))
        samples = _round_robin(workers, names, "step", warmup + steps, warmup, log)
        for n in names:
            per_arm[n].update(workers[n].call("train_end"))
            per_arm[n]["step_s"] = median([s["wall_s"] for s in samples[n]])
            per_arm[n]["step_cpu_s"] = median([s["cpu_s"] for s in samples[n]])
            per_arm[n]["step_wall_samples"] = [round(s["wall_s"], 4) for s in samples[n]]
            per_arm[n]["step_cpu_samples"] = [round(s["cpu_s"], 4) for s in samples[n]]
            per_arm[n].update(workers[n].call("merge"))
        res["load_average"]["inference"] = load_average()
        iw, reps = int(spec.get("infer_warmup", run["infer_warmup"])), int(spec.get("infer_reps", run["infer_reps"]))
        samples = _round_robin(workers, names, "infer", iw + reps, iw, log)
        for n in names:
            per_arm[n]["infer_s"] = median([s["wall_s"] for s in samples[n]])
            per_arm[n]["infer_cpu_s"] = median([s["cpu_s"] for s in samples[n]])
            per_arm[n]["infer_wall_samples"] = [round(s["wall_s"], 4) for s in samples[n]]
        res["load_average"]["end"] = load_average()
    finally:
        for w in workers.values():
            w.close()
    res.update(warmup_steps=warmup, steps=steps, infer_warmup=iw, infer_reps=reps)
    _ratios(per_arm, base_arm, spec.get("reference", "lora"))
    res["reference_arm"] = spec.get("reference", "lora")
    res["arms"] = per_arm
    return res


def _ratios(per_arm: dict, base_arm: str, ref: str) -> None:
    base = per_arm[base_arm]
    r = per_arm.get(ref)
    for a in per_arm.values():
        a["infer_vs_base"] = ratio(a.get("infer_s"), base.get("infer_s"))
        a["infer_cpu_vs_base"] = ratio(a.get("infer_cpu_s"), base.get("infer_cpu_s"))
        if r is None:
            continue
        a["vs_ref"] = {
            "step": ratio(a.get("step_s"), r.get("step_s")),
            "step_cpu": ratio(a.get("step_cpu_s"), r.get("step_cpu_s")),
            "peak_rss": ratio(a.get("peak_rss_mb"), r.get("peak_rss_mb")),
            "train_mem_above_model": ratio(a["peak_rss_mb"] - a["rss_before_train_mb"],
                                            r["peak_rss_mb"] - r["rss_before_train_mb"]),
            "max_allocated": ratio(a.get("max_allocated_mb"), r.get("max_allocated_mb")),
            "adapter_file": ratio(a.get("adapter_file_bytes"), r.get("adapter_file_bytes")),
            "setup": ratio(a.get("setup_s"), r.get("setup_s")),
        }


def run_benchmark(cfg: dict, log=print) -> dict:
    """Every backbone in ``cfg["run"]["backbones"]`` (default: all); returns the JSON-able result."""
    run = cfg["run"]
    names = run.get("backbones") or list(cfg["backbones"])
    result = {"benchmark": "efficiency", "config": copy.deepcopy(cfg), "machine": machine_info(int(run["threads"])),
              "versions": versions(), "load_average_start": load_average(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "isolated_processes": bool(run.get("isolate", True)),
              "backbones": {}}
    t0 = time.time()
    for name in names:
        result["backbones"][name] = run_backbone(name, cfg, log=log)
    if cfg.get("conv_delta"):
        cd = cfg["conv_delta"]
        result["conv_delta"] = []
        for out_ch, in_ch, spatial in cd["shapes"]:
            result["conv_delta"].append(conv_delta_costs(int(out_ch), int(in_ch), int(spatial), r=int(cd.get("r", 8)),
                                                         reps=int(cd.get("reps", 3))))
            log(f"[conv_delta] {result['conv_delta'][-1]}")
    result["load_average_end"] = load_average()
    result["wall_time_s"] = round(time.time() - t0, 1)
    return result


# -- a convolution's update: kernel-sized D versus thin factors -------------------------------------------------------
def conv_delta_costs(out_ch: int, in_ch: int, spatial: int, r: int = 8, k: int = 3, batch: int = 1,
                     reps: int = 3, seed: int = 0) -> dict:
    """Forward + backward CPU time of three ways to apply a tCURLoRA-style update ``D = C * B`` (t-product along the
    ``K = k^3`` kernel positions, ``C (K, out, r)``, ``B (K, r, in)``, only ``B`` trainable) to one Conv3d, on a
    ``(batch, in, s, s, s)`` input; median of ``reps`` after one warm-up, ``time.process_time`` (all threads).

    * ``base``: the frozen convolution alone (what every arm pays);
    * ``dense``: ``D`` through the FFT, ``conv(x, W + D)`` -- the one convolution of the base layer plus a kernel-sized
      FFT and the kernel's weight gradient (what peft_tensor does for convolutions);
    * ``factored``: never a kernel-sized ``D``: ``D x = sum_a C_a z_a`` with ``z = conv(x, B~)``, ``B~`` the
      ``(K r) x in x k^3`` kernel whose block ``a`` holds ``B_{(p - a) mod K}`` at position ``p``, then a 1x1x1
      convolution with ``C`` -- the convolution analogue of the Linear path (``K r`` channels at full resolution).
    """
    from peft_tensor.algebra import from_fourier, t_product_fourier, to_fourier

    g = torch.Generator().manual_seed(seed)
    K = k ** 3
    x = torch.randn(batch, in_ch, spatial, spatial, spatial, generator=g)
    w = torch.randn(out_ch, in_ch, k, k, k, generator=g) / (in_ch * K) ** 0.5
    c = torch.randn(K, out_ch, r, generator=g)
    b0 = torch.randn(K, r, in_ch, generator=g) * 1e-3
    roll = torch.stack([(torch.arange(K) - a) % K for a in range(K)])  # (a, p) -> (p - a) mod K

    def base():
        return torch.nn.functional.conv3d(x, w.requires_grad_(False), padding=k // 2)

    def dense(b):
        d = from_fourier(t_product_fourier(to_fourier(c), to_fourier(b)), K)  # (K, out, in)
        kernel = d.permute(1, 2, 0).reshape(out_ch, in_ch, k, k, k)
        return torch.nn.functional.conv3d(x, w + kernel, padding=k // 2)

    def factored(b):
        bt = b[roll]  # (a, p, r, in): B_{(p-a) mod K}
        kernel = bt.permute(0, 2, 3, 1).reshape(K * r, in_ch, k, k, k)
        z = torch.nn.functional.conv3d(x, kernel, padding=k // 2)  # (N, K r, s^3)
        a_flat = c.permute(1, 0, 2).reshape(out_ch, K * r, 1, 1, 1)  # C_a over (a, j)
        return base() + torch.nn.functional.conv3d(z, a_flat)

    with torch.no_grad():  # the two ways compute the same function
        torch.testing.assert_close(dense(b0), factored(b0), rtol=1e-4, atol=1e-5)
    x.requires_grad_(True)  # as inside a network: the input gradient is needed by the layers below
    out = {"shape": [out_ch, in_ch, k, k, k], "input": [batch, in_ch, spatial, spatial, spatial], "r": r}
    for name, fn in (("base", None), ("dense", dense), ("factored", factored)):
        times = []
        for i in range(reps + 1):
            b = b0.clone().requires_grad_(True)
            x.grad = None
            t = time.process_time()
            y = base() if fn is None else fn(b)
            y.square().mean().backward()
            if i:
                times.append(time.process_time() - t)
        out[f"{name}_cpu_s"] = median(times)
    return out


def conv_delta_table(rows: list[dict]) -> list[str]:
    lines = ["## A convolution's update: kernel-sized D vs thin factors", "",
             "Forward + backward of one Conv3d (3x3x3, tCURLoRA-style D = C * B along the 27 kernel positions, "
             "r = 8), "
             "median process CPU time; `dense` = conv(x, W + D) with D from the FFT (what peft_tensor runs), "
             "`factored` = never a kernel-sized D (a (27 r)-channel convolution, then a 1x1x1 one), see "
             "`conv_delta_costs`.", "",
             "| conv (out x in) | input | base s | dense s (×base) | factored s (×base) |", "|---|---|---:|---:|---:|"]
    for r in rows:
        b = r["base_cpu_s"]
        lines.append(f"| {r['shape'][0]} x {r['shape'][1]} | {shape_str(r['input'])} | {b:.4f} | "
                     f"{r['dense_cpu_s']:.4f} ({r['dense_cpu_s'] / b:.2f}) | "
                     f"{r['factored_cpu_s']:.4f} ({r['factored_cpu_s'] / b:.2f}) |")
    return lines + [""]


# -- report -----------------------------------------------------------------------------------------------------------
def _size(b):
    if b is None:
        return "—"
    if b < MB:
        return f"{b / 1024:.1f} KB"
    return f"{b / MB:.1f} MB"


def markdown_report(result: dict) -> str:
    """Tables (one per backbone) with ratios to the reference arm (PEFT LoRA r=8) and to the base network."""
    m, v = result["machine"], result["versions"]
    lines = ["# Efficiency benchmark", "",
             f"Machine: {m['cpu']}, {m['logical_cores']} logical cores, torch threads {m['torch_threads']}"
             + (f", GPU {m['gpu']}" if m.get("gpu") else "") + f"; {m.get('memory_gib', '?')} GiB.  ",
             f"Versions: torch {v['torch']}, peft {v['peft']}, transformers {v['transformers']}, monai {v['monai']}, "
             f"peft_tensor {v['peft_tensor']} (commit {v.get('git_commit')}).  ",
             f"Load average (1/5/15 min) at start {result['load_average_start']}, end {result['load_average_end']}; "
             f"total {result['wall_time_s']} s; started {result['started']}.  ",
             "Arms run in " + ("separate worker processes" if result["isolated_processes"] else
                               "ONE process (peak memory mixed across arms)") + ", training steps interleaved "
             "round-robin. Median over timed steps; CPU = process CPU time (all threads).", ""]
    for bname, b in result["backbones"].items():
        ref = b["reference_arm"]
        shape = shape_str(b["input"])
        lines += [f"## {bname}: {b['network']} ({b['base_params']:,} parameters), input {shape}, {b['device']}", "",
                  f"Load average: set-up {b['load_average'].get('setup')}, training {b['load_average'].get('train')}, "
                  f"inference {b['load_average'].get('inference')}. {b['warmup_steps']} warm-up + {b['steps']} "
                  f"timed steps, {b['infer_warmup']} + {b['infer_reps']} inference passes. Adapter arms: decoder "
                  f"frozen; '+ decoder' adds the decoder and head ({b['decoder_params']:,}) as the papers train it.",
                  ""]
        cuda = b["device"] == "cuda"
        mem_head = "peak alloc MB" if cuda else "peak RSS MB"
        lines += ["| arm | trainable | + decoder | adapter file | set-up s | step s | step CPU s | step ×LoRA "
                  f"(wall / CPU) | {mem_head} | train mem above model MB | ×LoRA (peak / above) | inference s | "
                  "×base (wall / CPU) | merge |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for n, a in b["arms"].items():
            r = a.get("vs_ref", {})
            # arms that train their decoder (or, _full, adapt it) already count it
            own = (a["method"] in ("full", "decoder_only") or a["method"].endswith(FULL_SUFFIX)
                   or a.get("trains_decoder"))
            plus_dec = a["trainable"] if own else a["trainable"] + b["decoder_params"]
            peak = a.get("max_allocated_mb") if cuda else a.get("peak_rss_mb")
            above = a["peak_rss_mb"] - a["rss_before_train_mb"]
            lines.append(
                f"| {a['label']}{' (ref)' if n == ref else ''} | {a['trainable']:,} | {plus_dec:,} | "
                f"{_size(a['adapter_file_bytes'])} | {fmt(a['setup_s'])} | {fmt(a['step_s'], '{:.3f}')} | "
                f"{fmt(a['step_cpu_s'], '{:.3f}')} | {fmt(r.get('step'))} / {fmt(r.get('step_cpu'))} | "
                f"{fmt(peak, '{:.0f}')} | {above:.0f} | "
                f"{fmt(r.get('max_allocated') if cuda else r.get('peak_rss'))} / "
                f"{fmt(r.get('train_mem_above_model'))}"
                f" | {fmt(a['infer_s'], '{:.3f}')} | {fmt(a['infer_vs_base'], '{:.3f}')} / "
                f"{fmt(a['infer_cpu_vs_base'], '{:.3f}')} | {a['note']} |")
        checks = target_checks(b)
        if checks:
            lines += ["", "Targets:", "", "| arm | target | value | met |", "|---|---|---:|---|"]
            lines += [f"| {c['arm']} | {c['target']} | {c['value']} | {'yes' if c['met'] else 'NO'} |" for c in checks]
        lines.append("")
    if result.get("conv_delta"):
        lines += conv_delta_table(result["conv_delta"])
    lines += ["Columns: *trainable* = parameters the optimiser updates (shared tensors once); *adapter file* = "
              "`adapter_model.safetensors` from `save_pretrained` (non-PEFT arms: their trainable weights as "
              "safetensors); *set-up* = `get_peft_model` incl. decompositions; *step* = zero_grad + forward + soft "
              "Dice + backward + Adam(amsgrad); *train mem above model* = peak RSS during training minus RSS just "
              "before it; *inference* = `no_grad` forward after `merge_and_unload`, against the floor arm's "
              "(unchanged) base network. The floor arm trains nothing but back-propagates through the frozen "
              "encoder.", ""]
    return "\n".join(lines)


def target_checks(b: dict) -> list[dict]:
    """:data:`TARGETS` for the arms of our methods (the registry's) against the reference arm, where both ran."""
    ref = b["arms"].get(b["reference_arm"])
    if ref is None:
        return []
    step_max, mem_max = TARGETS["step_vs_ref"], TARGETS["memory_vs_ref"]
    tol, setup_max = TARGETS["infer_vs_base_tolerance"], TARGETS["setup_s"]
    out = []
    for a in b["arms"].values():
        if a["method"] not in methods():
            continue
        r = a["vs_ref"]
        mem = r["max_allocated"] or r["peak_rss"]
        out += [
            {"arm": a["label"], "target": f"step time <= {step_max:.2f}x LoRA (wall)", "value": fmt(r["step"]),
             "met": r["step"] is not None and r["step"] <= step_max},
            {"arm": a["label"], "target": f"step time <= {step_max:.2f}x LoRA (CPU time)",
             "value": fmt(r["step_cpu"]), "met": r["step_cpu"] is not None and r["step_cpu"] <= step_max},
            {"arm": a["label"], "target": f"peak memory <= {mem_max:.2f}x LoRA", "value": fmt(mem),
             "met": mem <= mem_max},
            {"arm": a["label"], "target": f"merged inference within {tol:.0%} of base (wall)",
             "value": fmt(a["infer_vs_base"], "{:.3f}"), "met": abs(a["infer_vs_base"] - 1) <= tol},
            {"arm": a["label"], "target": f"merged inference within {tol:.0%} of base (CPU time)",
             "value": fmt(a["infer_cpu_vs_base"], "{:.3f}"), "met": abs(a["infer_cpu_vs_base"] - 1) <= tol},
            {"arm": a["label"], "target": f"set-up <= {setup_max:g} s", "value": fmt(a["setup_s"]) + " s",
             "met": a["setup_s"] <= setup_max},
            {"arm": a["label"], "target": "adapter file < LoRA's",
             "value": f"{_size(a['adapter_file_bytes'])} vs {_size(ref['adapter_file_bytes'])}",
             "met": a["adapter_file_bytes"] < ref["adapter_file_bytes"]},
        ]
    return out


def write_outputs(result: dict, out_dir, stem: str) -> tuple[Path, Path]:
    for b in result["backbones"].values():
        b["targets_checked"] = target_checks(b)
    return write_result(result, out_dir, stem, markdown_report)


# -- profiling --------------------------------------------------------------------------------------------------------
def profile_arm(cfg: dict, backbone: str, arm_name: str, steps: int = 3, row_limit: int = 30) -> str:
    """torch.profiler table (CPU time, self time, shapes) of ``steps`` training steps of one arm, after one warm-up."""
    from torch.profiler import ProfilerActivity, profile, record_function

    spec, run = cfg["backbones"][backbone], cfg["run"]
    job = {"backbone": spec, "arm": spec["arms"][arm_name], "size": run["size"], "batch": run["batch"],
           "threads": run["threads"], "device": "cpu", "seed": run.get("seed", 0)}
    w = ArmWorker(job)
    w.setup()
    w.train_begin()
    w.step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            with record_function("train_step"):
                w.step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit)


# -- command line -----------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_args(parser)
    parser.add_argument("--profile", metavar="BACKBONE:ARM", help="profile one arm's training steps and exit")
    args = parser.parse_args(argv)
    cfg = load_bench_config(args.config or default_config("efficiency"), args.overrides)
    torch.set_num_threads(int(cfg["run"]["threads"]))

    if args.profile:
        backbone, arm = args.profile.split(":")
        print(profile_arm(cfg, backbone, arm))
        return

    result = run_benchmark(cfg, log=lambda msg: print(msg, flush=True))
    print_written(*write_outputs(result, cfg["output_dir"], cfg.get("stem", "efficiency")))


if __name__ == "__main__":
    main()
