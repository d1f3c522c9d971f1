"""YAML recipe configs: lookup by name among the packaged configs, ``key.sub=value`` overrides."""

from __future__ import annotations

import copy
import os
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "recipes" / "configs"


def config_path(name_or_path: str | os.PathLike) -> Path:
    """A file path as given, else a packaged config by name (with or without ``.yaml``)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    for cand in (CONFIG_DIR / f"{name_or_path}.yaml", CONFIG_DIR / str(name_or_path)):
        if cand.is_file():
            return cand
    names = sorted(c.stem for c in CONFIG_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"no config file or packaged config named {name_or_path!r}; packaged: {', '.join(names)}")


def set_dotted(cfg: dict, key: str, value) -> None:
    parts = key.split(".")
    node = cfg
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def get_dotted(cfg: dict, key: str, default=None):
    node = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def apply_overrides(cfg: dict, overrides: list | dict | None) -> dict:
    """``["train.steps=10", "arm.name=lora"]`` (values parsed as YAML) or a dict of dotted keys."""
    import yaml

    cfg = copy.deepcopy(cfg)
    if not overrides:
        return cfg
    items = overrides.items() if isinstance(overrides, dict) else []
    if not isinstance(overrides, dict):
        parsed = []
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"override {item!r} is not key=value")
            k, v = item.split("=", 1)
            parsed.append((k.strip(), yaml.safe_load(v)))
        items = parsed
    for k, v in items:
        set_dotted(cfg, k, v)
    return cfg


def load_config(name_or_path: str | os.PathLike, overrides=None) -> dict:
    import yaml

    path = config_path(name_or_path)
    cfg = yaml.safe_load(path.read_text()) or {}
    base = cfg.pop("base", None)
    if base:  # a config may start from another one and change a few keys
        cfg = _merge(load_config(base), cfg)
    return apply_overrides(cfg, overrides)


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def parse_recipe_args(argv=None, default_config: str | None = None, description: str = "") -> dict:
    """``--config NAME_OR_PATH`` plus ``key.sub=value`` overrides -> the config dict (recipes' command line)."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config, required=default_config is None,
                        help="packaged config name (see `peft-tensor list`) or a YAML path")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=50 arm.name=lora")
    args = parser.parse_intermixed_args(argv)
    return load_config(args.config, args.overrides)


def patch_size(cfg: dict) -> tuple:
    """Training crop / inference window: ``train.patch`` or else the model's ``img_size`` (UNETR) or 96."""
    patch = get_dotted(cfg, "train.patch") or get_dotted(cfg, "model.img_size") or 96
    return tuple(int(p) for p in patch) if isinstance(patch, (list, tuple)) else (int(patch),) * 3


def total_steps(train_cfg: dict, n_train: int) -> int:
    """``train.steps`` if given, else ``train.epochs * ceil(n_train / batch_size)`` (the papers count epochs)."""
    import math

    if train_cfg.get("steps"):
        return int(train_cfg["steps"])
    if not train_cfg.get("epochs"):
        raise ValueError("the config needs train.steps or train.epochs")
    return int(train_cfg["epochs"]) * math.ceil(n_train / int(train_cfg.get("batch_size", 2)))
