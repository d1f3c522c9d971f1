"""``adapter_info``: what an adapter directory or Hub repo holds, without building any model."""

from __future__ import annotations

import os

from .adapter_files import WEIGHTS_NAME, group_summary, numel, read_config_file, tensor_shapes
from .cards import read_card
from .load import resolve
from .provenance import BaseNetwork, _human_size


def adapter_info(source: str | os.PathLike, *, revision: str | None = None, subfolder: str | None = None,
                 token: str | bool | None = None, cache_dir: str | None = None, local_files_only: bool = False,
                 endpoint: str | None = None) -> dict:
    """Method, base network, groups, parameter counts, file sizes and card summary of an adapter."""
    resolved = resolve(source, adapters={"default": subfolder}, revision=revision, token=token, cache_dir=cache_dir,
                       local_files_only=local_files_only, endpoint=endpoint, allow_pickle=True)
    folder = resolved.folders["default"]
    config = read_config_file(folder)
    shapes = tensor_shapes(folder) if (folder / WEIGHTS_NAME).is_file() else {}
    record = resolved.record or {}
    entry = next((e for e in (record.get("adapters") or {}).values() if e.get("subfolder") == subfolder), {})
    base = BaseNetwork.from_dict(record["base_network"]) if record.get("base_network") else None
    files = {}
    for path in sorted(resolved.root.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            files[path.relative_to(resolved.root).as_posix()] = path.stat().st_size
    card = {}
    readme = resolved.root / "README.md"
    if readme.is_file():
        parsed = read_card(readme)  # CardError unless UTF-8 with safely loadable YAML metadata
        tags = parsed.data.tags or []
        card = {  # plain strings only: the metadata may hold anything YAML can (numbers, dates, nested lists)
            "tags": [str(t) for t in (tags if isinstance(tags, list) else [tags]) if isinstance(t, (str, int, float))],
            "library_name": None if parsed.data.library_name is None else str(parsed.data.library_name),
            "eval_results": [f"{r.metric_name or r.metric_type} = {r.metric_value} on {r.dataset_name}"
                             for r in parsed.data.eval_results or []],
            "title": next((line[2:].strip() for line in parsed.text.splitlines() if line.startswith("# ")), None),
        }
    return {
        "source": str(source),
        "commit": resolved.commit,
        "subfolder": subfolder,
        "method": str(config["peft_type"]),
        "hyperparameters": {k: config.get(k) for k in ("r", "target_modules", "grouping", "modules_to_save",
                                                       "lora_alpha", "core", "init_weights") if k in config},
        "base_network": base.describe() if base else None,
        "base_weights": base.weights.describe() if base and base.weights else None,
        "groups": group_summary(shapes, config, list(entry.get("module_shapes") or ())),
        "trainable_params": entry.get("trainable_params"),
        "stored_values": sum(numel(s) for s in shapes.values()) if shapes else None,
        "files": files,
        "card": card,
        "written_by": record.get("written_by"),
    }


def format_info(info: dict) -> str:
    rows = [("source", info["source"] + (f" @ {info['commit']}" if info.get("commit") else "")
             + (f" (subfolder {info['subfolder']})" if info.get("subfolder") else ""))]
    hyper = ", ".join(f"{k}={v}" for k, v in info["hyperparameters"].items())
    rows.append(("method", f"{info['method']}" + (f" ({hyper})" if hyper else "")))
    rows.append(("base network", info["base_network"] or "not recorded (pass base_model= when loading)"))
    rows.append(("base weights", info["base_weights"] or "not recorded"))
    for i, line in enumerate(info["groups"] or ["-"]):
        rows.append(("groups" if i == 0 else "", line))
    counts = []
    if info.get("trainable_params") is not None:
        counts.append(f"{info['trainable_params']:,} trainable")
    if info.get("stored_values") is not None:
        counts.append(f"{info['stored_values']:,} values stored")
    rows.append(("parameters", ", ".join(counts) or "unknown"))
    for i, (name, size) in enumerate(info["files"].items()):
        rows.append(("files" if i == 0 else "", f"{name}  {_human_size(size)}"))
    card = info.get("card") or {}
    if card:
        rows.append(("card", f"{card.get('title') or ''}  tags: {', '.join(card.get('tags') or [])}"))
        for result in card.get("eval_results") or []:
            rows.append(("", result))
    if info.get("written_by"):
        rows.append(("written by", ", ".join(f"{k} {v}" for k, v in info["written_by"].items())))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
