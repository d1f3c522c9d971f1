"""ViT-level micro-benchmark: forward + backward of UNETR-B's 12 transformer blocks only, every arm (issue 14).

    python benchmarks/vit_blocks.py                                   # configs/vit_blocks_cpu.yaml (gpu on CUDA)
    python benchmarks/vit_blocks.py --config vit_blocks_cpu run.steps=3
    python benchmarks/vit_blocks.py --config vit_blocks_cpu "run.cells=[[512,1]]" run.delta_modes=[]

Writes ``<output_dir>/<stem>.json`` and ``<stem>.md`` (default ``benchmarks/results/vit_blocks_{cpu,gpu}``) after
every (tokens, batch) cell, so an interrupted run keeps what it measured. Configs are read by the recipes' reader
(:mod:`peft_tensor.training.config`, names looked up in ``benchmarks/configs/``); the PEFT config of an arm is the
recipes' (:func:`peft_tensor.training.arms.peft_config`), applied with ``peft.get_peft_model`` to the blocks.

The network is the ``blocks`` ModuleList of MONAI's ``ViT`` built exactly as ``UNETR`` builds it (UNETR-B:
hidden 768, MLP 3072, 12 heads, 12 layers, no qkv bias), wrapped in :class:`ViTBlocks` (runs the blocks in order),
so the targeted modules are ``blocks.N.attn.qkv``, ``attn.out_proj``, ``mlp.linear1``, ``mlp.linear2`` as inside
UNETR (``vit.blocks.N...``) and the paper grouping applies. The decoder, the patch embedding and the convolutions
are left out: at the papers' token counts (512 tokens = a 128^3 input at patch 16, 1024 = 128x128x256) this is
where the adapters' cost lies.

Input: a random ``(batch, tokens, hidden)`` tensor with ``requires_grad=True`` in **every** arm, so the *floor* arm
(all blocks frozen) back-propagates through all 12 blocks to the input: the cost every encoder adapter pays at
least, and every arm computes the same input gradients on top of its own. Loss: mean of squares of the output.
One step = grads cleared + forward + loss + backward (no optimiser).

All arms live in one process (their models built once, reused for every cell) and are timed **round-robin, one
step of each arm in turn** (the starting arm rotates each round), after warm-up rounds. Per arm and cell:

* step time: median over the timed steps of wall clock and process CPU time (``time.process_time``, all
  threads); on CUDA also CUDA-event time, with ``torch.cuda.synchronize`` around every step;
* saved activations: bytes of the tensors autograd saves for backward during one (untimed-for-speed) step,
  through ``torch.autograd.graph.saved_tensors_hooks``, each storage once, *excluding* the model's parameters and
  buffers and the input (held anyway): a device-independent memory proxy (a dense ``W + D`` built in the forward
  counts, a frozen weight saved for ``dX = dY W`` does not). ``saved_total_mb`` includes the resident ones;
* adapter-held bytes: the adapter's own tensors (parameters and buffers the base network does not have, each
  storage once) plus what its groups cache between steps (``delta_mode='dense'``: one ``D`` per group, held from a
  forward until the next one);
* on CUDA: peak ``max_memory_allocated`` during a step minus the memory allocated just before it (peak stats
  reset before every step), the largest over the timed steps;
* on CPU (``run.memory_probe``, default on for CPU): the step's peak resident memory above the resident memory
  just before it, **each arm in a fresh process** (:func:`memory_probe`): the arm is built, the kernel's peak-RSS
  mark is reset (``/proc/self/clear_refs``) and one step runs, with glibc told to return every freed block of
  64 KiB or more to the system (``MALLOC_MMAP_THRESHOLD_``), so the mark follows the live tensors. This catches
  what the saved-tensor count cannot: temporaries of the backward pass (e.g. the stacked gradient of a dense
  ``D``) and the gradients of the trainable parameters.

Ratios: ``x floor`` against the floor arm (``floor_arm``), ``x LoRA`` against the reference arm (``reference``,
PEFT LoRA r=8) of the same cell. Arms of a method whose config class has a ``delta_mode`` field are also run with
each of ``run.delta_modes`` (default ``factored`` and ``dense``), so before / after a change of how the update is
applied shows in one table.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):  # run as a file (python benchmarks/<script>.py): the checkout's root, for _common
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from benchmarks._common import (MB, CONFIG_DIR, REPO, Stopwatch, add_config_args, default_config, fmt, load_average,
                                load_bench_config, machine_info, median, method_of, print_written, proc_status_kb,
                                ratio, reset_peak_rss, round_robin, shape_str, unique_params, versions, write_result)
from peft_tensor.registry import methods
from peft_tensor.training.arms import peft_config

__all__ = ["ViTBlocks", "build_blocks", "expand_arms", "build_arm", "saved_activation_bytes", "adapter_held_bytes",
           "memory_probe", "run_benchmark", "markdown_report", "write_outputs", "main", "MB", "CONFIG_DIR"]


def _worktree() -> dict:
    """Uncommitted changes under ``peft_tensor/`` at start (the code measured may differ from ``git_commit``):
    the changed files and the SHA-1 of ``git diff HEAD -- peft_tensor``."""
    import hashlib
    import subprocess

    try:
        kw = {"capture_output": True, "text": True, "cwd": REPO, "timeout": 20}
        files = subprocess.run(["git", "diff", "HEAD", "--name-only", "--", "peft_tensor"], **kw).stdout.split()
        diff = subprocess.run(["git", "diff", "HEAD", "--", "peft_tensor"], **kw).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"peft_tensor_changed_files": files, "peft_tensor_diff_sha1": hashlib.sha1(diff.encode()).hexdigest()
            if files else None}


# -- network and arms -------------------------------------------------------------------------------------------------
class ViTBlocks(nn.Module):
    """The transformer blocks of a MONAI ViT, run in order (module names ``blocks.N.attn.qkv`` etc.)."""

    def __init__(self, blocks: nn.ModuleList) -> None:
        super().__init__()
        self.blocks = blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x


def build_blocks(model_cfg: dict, seed: int = 0) -> ViTBlocks:
    """MONAI ``ViT`` with UNETR's arguments (``model_cfg``), its ``blocks`` wrapped in :class:`ViTBlocks`."""
    from monai.networks.nets import ViT

    m = dict(model_cfg)
    torch.manual_seed(seed)
    vit = ViT(in_channels=int(m.get("in_channels", 1)), img_size=m.get("img_size", 128),
              patch_size=m.get("patch_size", 16), hidden_size=int(m["hidden_size"]), mlp_dim=int(m["mlp_dim"]),
              num_layers=int(m.get("num_layers", 12)), num_heads=int(m["num_heads"]),
              proj_type=m.get("proj_type", "conv"), classification=False,
              dropout_rate=float(m.get("dropout_rate", 0.0)), spatial_dims=int(m.get("spatial_dims", 3)),
              qkv_bias=bool(m.get("qkv_bias", False)))
    return ViTBlocks(vit.blocks)


def _has_delta_mode(method: str) -> bool:
    spec = methods().get(method)
    return spec is not None and "delta_mode" in {f.name for f in dataclasses.fields(spec.config_cls)}


def expand_arms(arms: dict, delta_modes) -> dict:
    """The configured arms, each arm of a method whose config class has a ``delta_mode`` field (and that does not
    set one) followed by one copy per mode in ``delta_modes`` (name ``<arm>_<mode>``, label ``..., <mode>``).
    An arm set to null (``arms.<name>=null`` on the command line) is left out."""
    out = {}
    for name, arm in arms.items():
        if arm is None:
            continue
        out[name] = dict(arm)
        if "delta_mode" in arm or not _has_delta_mode(method_of(arm)):
            continue
        for mode in delta_modes or ():
            label = arm.get("label", name)
            out[f"{name}_{mode}"] = {**arm, "delta_mode": mode, "label": f"{label}, delta_mode={mode}"}
    return out


def build_arm(base: ViTBlocks, arm: dict, targets: list[str], device: torch.device) -> tuple[nn.Module, dict]:
    """A copy of ``base`` prepared for ``arm``: frozen (``floor``) or ``get_peft_model`` with the recipes' PEFT
    config of the arm (``target_modules`` = ``targets``, nothing else trained). Returns (model, info)."""
    from peft import get_peft_model

    model = copy.deepcopy(base).to(device)
    model.requires_grad_(False)
    fields = {k: v for k, v in arm.items() if k != "label"}
    info: dict[str, Any] = {"method": method_of(arm), "label": arm.get("label", arm["name"]),
                            "fields": {k: v for k, v in fields.items() if k != "name"}}
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    watch = Stopwatch()
    if info["method"] != "floor":
        fields.setdefault("target_modules", list(targets))
        fields.setdefault("modules_to_save", [])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(model, peft_config(fields["name"], fields, {"name": "unetr"}))
    sync()
    info["setup_s"], info["setup_cpu_s"] = watch.elapsed()
    info["trainable"] = sum(p.numel() for p in unique_params(model) if p.requires_grad)
    model.train()
    return model, info


# -- one step ---------------------------------------------------------------------------------------------------------
def _storage_key(t: torch.Tensor):
    try:
        s = t.untyped_storage()
        return (str(t.device), s.data_ptr()), s.nbytes()
    except (RuntimeError, NotImplementedError):  # tensors without a plain storage: count their own bytes
        return (str(t.device), "id", id(t)), t.numel() * t.element_size()


def saved_activation_bytes(model: nn.Module, x: torch.Tensor, loss_fn, keys_out: Optional[set] = None
                           ) -> tuple[int, int]:
    """(activation bytes, total bytes) autograd saves for backward in one forward of ``model`` on ``x``, each
    storage once; activations exclude the storages of ``model``'s parameters and buffers and of ``x``. Runs the
    backward too (so the step is complete) and clears the gradients."""
    resident = {_storage_key(t)[0] for t in (*model.parameters(), *model.buffers(), x)}
    seen: dict = {}

    def pack(t):
        key, nbytes = _storage_key(t)
        seen[key] = nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model(x))
    loss.backward()
    _clear(model, x, drop_caches=False)  # the caches are counted next (adapter_held_bytes)
    if keys_out is not None:
        keys_out.update(seen)
    total = sum(seen.values())
    return total - sum(b for k, b in seen.items() if k in resident), total


def _tensors_in(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors_in(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors_in(v)


def adapter_held_bytes(model: nn.Module, base_bytes: int, exclude: frozenset = frozenset()) -> tuple[int, int]:
    """(state bytes, cache bytes) an adapter holds: the bytes of ``model``'s parameters and buffers (each storage
    once) above ``base_bytes`` (the base network's), and the tensors its tensor groups cache between forward passes
    (the per-forward factors, or a dense ``D`` per group), each storage once, storages in ``exclude`` (e.g. those
    already counted as saved for backward) left out of the cache bytes."""
    seen: dict = {}
    for t in (*model.parameters(), *model.buffers()):
        key, nbytes = _storage_key(t)
        seen[key] = nbytes
    state = sum(seen.values()) - base_bytes
    cache: dict = {}
    for m in model.modules():
        live = m.__dict__.get("_live")
        if isinstance(live, dict):
            for t in _tensors_in(live):
                key, nbytes = _storage_key(t)
                if key not in seen and key not in exclude:
                    cache[key] = nbytes
    return state, sum(cache.values())


def memory_probe(cfg: dict, arm_name: str, tokens: int, batch: int) -> dict:
    """In *this* process (meant to be a fresh one, see :func:`_run_probe`): build arm ``arm_name``, reset the peak
    resident-memory mark, run one step on ``(batch, tokens, hidden)`` and return the step's peak above the resident
    memory before it (MB). CPU only (Linux ``/proc``)."""
    import gc

    run = cfg["run"]
    torch.set_num_threads(int(run.get("threads", 1)))
    arm = expand_arms(cfg["arms"], run.get("delta_modes", ["factored", "dense"]))[arm_name]
    base = build_blocks(cfg["model"], seed=int(run.get("seed", 0)))
    model, _ = build_arm(base, arm, cfg["targets"], torch.device("cpu"))
    del base
    gen = torch.Generator().manual_seed(int(run.get("seed", 0)) + 1)
    x = torch.randn(batch, tokens, int(cfg["model"]["hidden_size"]), generator=gen).requires_grad_(True)
    _clear(model, x)
    gc.collect()
    rss0 = proc_status_kb("VmRSS")
    if not reset_peak_rss():  # VmHWM (the peak RSS mark) to the current RSS
        raise OSError("cannot reset the peak-RSS mark through /proc/self/clear_refs")
    _loss(model(x)).backward()
    peak = proc_status_kb("VmHWM")
    return {"peak_above_mb": (peak - rss0) / 1024, "rss_before_mb": rss0 / 1024, "peak_rss_mb": peak / 1024}


def _run_probe(cfg: dict, arm_name: str, tokens: int, batch: int, timeout: float) -> dict:
    """:func:`memory_probe` in a fresh Python process (glibc returns freed blocks >= 64 KiB to the system there)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "probe.json"
        spec.write_text(json.dumps({"cfg": cfg, "arm": arm_name, "tokens": tokens, "batch": batch}, default=str))
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--memory-probe", str(spec)],
                              capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe of {arm_name} failed: {proc.stderr.strip()[-800:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _clear(model: nn.Module, x: torch.Tensor, drop_caches: bool = True) -> None:
    """Gradients cleared and the tensor groups' per-forward caches dropped (the next forward rebuilds them anyway),
    so memory measured from here on counts this step's own ``D`` / factors."""
    x.grad = None
    for p in model.parameters():
        p.grad = None
    for m in model.modules() if drop_caches else ():
        live = m.__dict__.get("_live")
        if isinstance(live, dict):
            live.clear()


def _loss(y: torch.Tensor) -> torch.Tensor:
    return y.float().pow(2).mean()


def _step(model: nn.Module, x: torch.Tensor, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    _clear(model, x)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        ev0.record()
    watch = Stopwatch()
    _loss(model(x)).backward()
    if cuda:
        ev1.record()
        torch.cuda.synchronize(device)
    wall, cpu = watch.elapsed()
    out = {"wall_ms": wall * 1e3, "cpu_ms": cpu * 1e3}
    if cuda:
        out["cuda_ms"] = ev0.elapsed_time(ev1)
        out["peak_above_mb"] = (torch.cuda.max_memory_allocated(device) - before) / MB
    return out


# -- the run ----------------------------------------------------------------------------------------------------------
def _cells(run: dict) -> list[tuple[int, int]]:
    if run.get("cells"):
        return [(int(t), int(b)) for t, b in run["cells"]]
    return [(int(t), int(b)) for t in run["tokens"] for b in run["batches"]]


def _ratios(cell_arms: dict, floor: str, ref: str) -> None:
    """Each arm's ratios to the floor arm and to the reference arm *of the same cell* (None where one is absent)."""
    f, r = cell_arms.get(floor, {}), cell_arms.get(ref, {})
    for a in cell_arms.values():
        if "peak_above_mb" in a:  # the step's measured peak (CUDA allocator or the CPU probe) + the adapter's state
            a["step_memory_mb"] = a["peak_above_mb"] + a.get("adapter_state_mb", 0.0)
    for a in cell_arms.values():
        if "error" in a:
            continue
        a["vs_floor"] = {"step": ratio(a["step_ms"], f.get("step_ms")),
                         "step_cpu": ratio(a["cpu_ms"], f.get("cpu_ms"))}
        a["vs_lora"] = {"step": ratio(a["step_ms"], r.get("step_ms")),
                        "step_cpu": ratio(a["cpu_ms"], r.get("cpu_ms")),
                        "saved_act": ratio(a["saved_act_mb"], r.get("saved_act_mb")),
                        "memory_proxy": ratio(a.get("memory_proxy_mb"), r.get("memory_proxy_mb"))}
        a["vs_lora"]["step_memory"] = ratio(a.get("step_memory_mb"), r.get("step_memory_mb"))
        if "cuda_ms" in a:
            a["vs_floor"]["cuda"] = ratio(a["cuda_ms"], f.get("cuda_ms"))
            a["vs_lora"]["cuda"] = ratio(a["cuda_ms"], r.get("cuda_ms"))


def run_cell(models: dict, tokens: int, batch: int, hidden: int, run: dict, device: torch.device, log) -> dict:
    """One (tokens, batch) cell: saved-activation bytes per arm, then warm-up and timed rounds round-robin."""
    gen = torch.Generator().manual_seed(int(run.get("seed", 0)) + 1)
    x = torch.randn(batch, tokens, hidden, generator=gen).to(device).requires_grad_(True)
    names = list(models)
    out: dict[str, dict] = {n: {} for n in names}
    for n in names:  # also the first warm-up of each arm
        keys: set = set()
        act, total = saved_activation_bytes(models[n], x, _loss, keys_out=keys)
        state, cache = adapter_held_bytes(models[n], int(run.get("_base_bytes", 0)), frozenset(keys))
        # memory proxy: what backward keeps + the adapter's own tensors + its caches not already saved
        out[n].update(saved_act_mb=act / MB, saved_total_mb=total / MB, adapter_state_mb=state / MB,
                      adapter_cache_mb=cache / MB, memory_proxy_mb=(act + state + cache) / MB)
    warmup, steps = int(run["warmup_steps"]), int(run["steps"])
    load0 = load_average()
    samples = round_robin(names, lambda n: _step(models[n], x, device), warmup + steps, warmup,
                          on_round=lambda i: log(f"  [{tokens} tokens x {batch}] round {i + 1}/{warmup + steps}"
                                                 f"{' (warm-up)' if i < warmup else ''} done, load {load_average()}"))
    for n in names:
        _clear(models[n], x)
        a, ss = out[n], samples[n]
        a["step_ms"] = median([s["wall_ms"] for s in ss])
        a["cpu_ms"] = median([s["cpu_ms"] for s in ss])
        a["wall_samples_ms"] = [round(s["wall_ms"], 2) for s in ss]
        a["cpu_samples_ms"] = [round(s["cpu_ms"], 2) for s in ss]
        if device.type == "cuda":
            a["cuda_ms"] = median([s["cuda_ms"] for s in ss])
            a["cuda_samples_ms"] = [round(s["cuda_ms"], 3) for s in ss]
            a["peak_above_mb"] = max(s["peak_above_mb"] for s in ss)
    if _probe_enabled(run, device):
        for n in names:
            try:
                out[n].update(_run_probe(run["_cfg"], n, tokens, batch, float(run.get("probe_timeout_s", 1800))))
                log(f"  [{tokens} tokens x {batch}] memory probe {n}: peak {out[n]['peak_above_mb']:.0f} MB above")
            except (RuntimeError, OSError, ValueError, subprocess_error()) as err:
                out[n]["probe_error"] = str(err)[-300:]
                log(f"  [{tokens} tokens x {batch}] memory probe {n} FAILED: {out[n]['probe_error']}")
    return {"tokens": tokens, "batch": batch, "input": [batch, tokens, hidden], "warmup_steps": warmup,
            "steps": steps, "load_average": {"start": load0, "end": load_average()}, "arms": out}


def subprocess_error():
    import subprocess

    return subprocess.SubprocessError


def _probe_enabled(run: dict, device: torch.device) -> bool:
    want = run.get("memory_probe", "auto")
    if want in (False, "false", "off", None):
        return False
    return device.type == "cpu" and Path("/proc/self/clear_refs").exists() and "_cfg" in run


def run_benchmark(cfg: dict, log=print, on_cell=None) -> dict:
    """Build every arm once, then run every cell; ``on_cell(result)`` after each cell (partial results)."""
    run = cfg["run"]
    device = run.get("device", "auto")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    threads = int(run.get("threads", 1))
    torch.set_num_threads(threads)
    arms = expand_arms(cfg["arms"], run.get("delta_modes", ["factored", "dense"]))
    floor, ref = cfg.get("floor_arm", "floor"), cfg.get("reference", "lora")
    result: dict[str, Any] = {"benchmark": "vit_blocks", "config": copy.deepcopy(cfg),
                              "machine": machine_info(threads), "versions": {**versions(), **_worktree()},
                              "device": str(device),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average_start": load_average(),
                              "floor_arm": floor, "reference_arm": ref, "arms": {}, "cells": [],
                              "delta_mode_available": {m: _has_delta_mode(m) for m in methods()}}
    t0 = time.time()
    base = build_blocks(cfg["model"], seed=int(run.get("seed", 0)))
    result["base_params"] = sum(p.numel() for p in base.parameters())
    models: dict[str, nn.Module] = {}
    for n, arm in arms.items():
        try:
            models[n], result["arms"][n] = build_arm(base, arm, cfg["targets"], device)
            log(f"set-up {n}: {result['arms'][n]['setup_s']:.2f} s, {result['arms'][n]['trainable']:,} trainable")
        except Exception as err:  # noqa: BLE001 - reported in the table, the other arms still run
            result["arms"][n] = {"method": method_of(arm), "label": arm.get("label", n), "error":
                                 f"{type(err).__name__}: {err}"}
            log(f"set-up {n} FAILED: {result['arms'][n]['error']}")
    base_bytes = sum(t.numel() * t.element_size() for t in (*base.parameters(), *base.buffers()))
    del base
    run_ctx = {**run, "_cfg": copy.deepcopy(cfg), "_base_bytes": base_bytes}
    for tokens, batch in _cells(run):
        cell = run_cell(models, tokens, batch, int(cfg["model"]["hidden_size"]), run_ctx, device, log)
        for n, a in result["arms"].items():
            if "error" in a:
                cell["arms"][n] = {"error": a["error"]}
        cell["arms"] = {n: cell["arms"][n] for n in result["arms"]}  # configured order
        _ratios(cell["arms"], floor, ref)
        result["cells"].append(cell)
        result["load_average_end"] = load_average()
        result["wall_time_s"] = round(time.time() - t0, 1)
        if on_cell is not None:
            on_cell(result)
    return result


# -- report -----------------------------------------------------------------------------------------------------------
def markdown_report(result: dict) -> str:
    """One table per (tokens, batch) cell, ratios to the floor and to PEFT LoRA of that cell."""
    m, v = result["machine"], result["versions"]
    cuda = result["device"].startswith("cuda")
    ref, floor = result["reference_arm"], result["floor_arm"]
    dm = ", ".join(f"{k}: {'yes' if ok else 'no'}" for k, ok in result["delta_mode_available"].items())
    lines = ["# ViT-blocks micro-benchmark (UNETR-B transformer blocks, forward + backward)", "",
             f"Machine: {m['cpu']}, {m['logical_cores']} logical cores, torch threads {m['torch_threads']}"
             + (f", GPU {m['gpu']}" if m.get("gpu") else "") + f"; {m.get('memory_gib', '?')} GiB; device "
             f"{result['device']}.  ",
             f"Versions: torch {v['torch']}, peft {v['peft']}, monai {v['monai']}, peft_tensor {v['peft_tensor']} "
             f"(commit {v.get('git_commit')}"
             + (f"; uncommitted changes in {', '.join(v['peft_tensor_changed_files'])}, diff sha1 "
                f"{v['peft_tensor_diff_sha1'][:12]}" if v.get("peft_tensor_changed_files") else "") + ").  ",
             f"Load average (1/5/15 min) at start {result['load_average_start']}, end "
             f"{result.get('load_average_end')}; total {result.get('wall_time_s')} s; started {result['started']}.  ",
             f"Network: {result['base_params']:,} parameters ({result['config']['model'].get('num_layers', 12)} "
             f"blocks), targets {', '.join(result['config']['targets'])}. Config field `delta_mode` present: {dm}.",
             "", "| arm | trainable | set-up s |", "|---|---:|---:|"]
    for n, a in result["arms"].items():
        if "error" in a:
            lines.append(f"| {a['label']} | FAILED: {a['error']} | |")
        else:
            lines.append(f"| {a['label']} | {a['trainable']:,} | {a['setup_s']:.2f} |")
    lines.append("")
    for c in result["cells"]:
        lines += [f"## {c['tokens']} tokens, batch {c['batch']} (input {shape_str(c['input'])})", "",
                  f"1 untimed step (saved activations) + {c['warmup_steps']} warm-up + {c['steps']} timed steps per "
                  f"arm, round-robin; load average "
                  f"{c['load_average']['start']} -> {c['load_average']['end']}.", ""]
        probe = any("peak_above_mb" in a for a in c["arms"].values()) and not cuda
        head = "| arm | step ms (wall) | CPU ms | x floor (wall / CPU) | x LoRA (wall / CPU) | saved-activation MB " \
               "| adapter MB (state + cache) | x LoRA memory (proxy) |"
        rule = "|---|---:|---:|---:|---:|---:|---:|---:|"
        if cuda:
            head += " CUDA ms | x floor (CUDA) | x LoRA (CUDA) | step peak alloc MB | x LoRA (peak + state) |"
            rule += "---:|---:|---:|---:|---:|"
        elif probe:
            head += " step peak RSS MB (own process) | x LoRA (peak + state) |"
            rule += "---:|---:|"
        lines += [head, rule]
        for n, a in c["arms"].items():
            label = result["arms"][n]["label"] + (" (ref)" if n == ref else "") + (" (floor)" if n == floor else "")
            if "error" in a:
                lines.append(f"| {label} | FAILED | | | | | | |" + (" | | | | |" if cuda else " | |" if probe else ""))
                continue
            f, r = a["vs_floor"], a["vs_lora"]
            row = (f"| {label} | {fmt(a['step_ms'], '{:.1f}')} | {fmt(a['cpu_ms'], '{:.1f}')} | "
                   f"{fmt(f['step'])} / {fmt(f['step_cpu'])} | {fmt(r['step'])} / {fmt(r['step_cpu'])} | "
                   f"{a['saved_act_mb']:.1f} | {a.get('adapter_state_mb', 0):.1f} + "
                   f"{a.get('adapter_cache_mb', 0):.1f} | {fmt(r.get('memory_proxy'))} |")
            if cuda:
                row += (f" {fmt(a['cuda_ms'], '{:.2f}')} | {fmt(f['cuda'])} | {fmt(r['cuda'])} | "
                        f"{a['peak_above_mb']:.1f} | {fmt(r.get('step_memory'))} |")
            elif probe:
                row += f" {fmt(a.get('peak_above_mb'), '{:.0f}')} | {fmt(r.get('step_memory'))} |"
            lines.append(row)
        lines.append("")
    lines += ["Columns: *step* = grads cleared + forward of the blocks + mean-square loss + backward (input requires "
              "grad in every arm, so the floor back-propagates through the frozen blocks to it), median; *CPU* = "
              "process CPU time (all threads); *saved-activation MB* = bytes autograd saves for backward in one step, "
              "each storage once, without the model's parameters / buffers and the input; *adapter MB* = the "
              "adapter's own parameters and buffers (state) + what its groups cache between forward passes and "
              "backward did not already save (cache; a dense `D` per group is saved, so it shows in the saved "
              "column); *memory (proxy)* = saved + state + cache; ratios are to the floor arm and to PEFT LoRA r=8 "
              "of the same table"
              + ("; *step peak alloc* = `max_memory_allocated` during a step minus the memory allocated before it "
                 "(largest over the timed steps), *peak + state* adds the adapter's state." if cuda else
                 "; *step peak RSS* = peak resident memory of one step above the resident memory before it, each arm "
                 "built and stepped in a fresh process (glibc returning freed blocks >= 64 KiB), *peak + state* adds "
                 "the adapter's state." if any("peak_above_mb" in a for c in result["cells"]
                                              for a in c["arms"].values()) else "."), ""]
    return "\n".join(lines)


def write_outputs(result: dict, out_dir, stem: str) -> tuple[Path, Path]:
    return write_result(result, out_dir, stem, markdown_report)


# -- command line -----------------------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_args(parser)
    parser.add_argument("--memory-probe", metavar="SPEC_JSON", help=argparse.SUPPRESS)  # internal: one arm's probe
    args = parser.parse_args(argv)
    if args.memory_probe:
        spec = json.loads(Path(args.memory_probe).read_text())
        out = memory_probe(spec["cfg"], spec["arm"], int(spec["tokens"]), int(spec["batch"]))
        print(json.dumps(out))
        return out
    cfg = load_bench_config(args.config or default_config("vit_blocks"), args.overrides)
    stem = cfg.get("stem", "vit_blocks")
    result = run_benchmark(cfg, log=lambda msg: print(msg, flush=True),
                           on_cell=lambda res: write_outputs(res, cfg["output_dir"], stem))
    print_written(*write_outputs(result, cfg["output_dir"], stem))
    return result


if __name__ == "__main__":
    main()
