"""The one config reader of the recipes and benchmarks: YAML files, ``base:`` inheritance, ``key.sub=value`` overrides.

A config is a YAML mapping. It may start with ``base: <name>``: the named config is read first (recursively) and
this file's keys are merged into it, nested mappings key by key, everything else replaced. Names are looked up
among the packaged recipe configs (``peft_tensor.recipes`` ``configs/``, the repository's ``recipes/configs/``)
and in any extra folders a caller names (the benchmarks pass ``benchmarks/configs``); a path to a file works
everywhere. A recipe config is then checked against its recipe's schema and filled with the defaults
(:mod:`peft_tensor.training.schema`: unknown keys and wrong types are refused). ``peft-tensor cat <config>`` prints
the fully resolved config, defaults filled in, and ``peft-tensor copy <config>`` writes that resolved form, so a
copied config stands on its own (no ``base:`` left to chase).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Iterable, Sequence

import peft_tensor.recipes
from .._safe_yaml import load_yaml

CONFIG_DIR = Path(peft_tensor.recipes.__file__).resolve().parent / "configs"

__all__ = ["CONFIG_DIR", "apply_overrides", "config_names", "config_path", "dump_config", "get_dotted",
           "load_config", "parse_recipe_args", "patch_size", "run_recipe", "set_dotted", "total_steps"]


def _dirs(search: Iterable[str | os.PathLike] | None) -> list[Path]:
    return [Path(d) for d in (search or ())] + [CONFIG_DIR]


def config_names(search: Iterable[str | os.PathLike] | None = None) -> list[str]:
    """Names of the configs in ``search`` folders and the packaged ones."""
    return sorted({c.stem for d in _dirs(search) for c in d.glob("*.yaml")})


def config_path(name_or_path: str | os.PathLike, search: Iterable[str | os.PathLike] | None = None) -> Path:
    """A file path as given, else a config by name (with or without ``.yaml``) in ``search``, then packaged."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    stem = str(name_or_path).removesuffix(".yaml")
    for folder in _dirs(search):
        if (folder / f"{stem}.yaml").is_file():
            return folder / f"{stem}.yaml"
    known = ", ".join(config_names(search))
    raise FileNotFoundError(f"no config file or config named {name_or_path!r}; known: {known}")


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


def apply_overrides(cfg: dict, overrides: Sequence[str] | dict | None) -> dict:
    """``["train.steps=10", "arm.name=lora"]`` (values parsed as YAML) or a dict of dotted keys; returns a copy."""
    cfg = copy.deepcopy(cfg)
    if not overrides:
        return cfg
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = []
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"override {item!r} is not key=value")
            k, v = item.split("=", 1)
            items.append((k.strip(), load_yaml(v)))
    for k, v in items:
        set_dotted(cfg, k, v)
    return cfg


def load_config(name_or_path: str | os.PathLike, overrides=None,
                search: Iterable[str | os.PathLike] | None = None, schema: str | type | None = "auto") -> dict:
    """The resolved config: ``base:`` chain merged, then ``overrides`` applied, then checked against the schema of
    its recipe and filled with its defaults (:func:`peft_tensor.training.schema.validate_config`: ``"auto"`` infers
    the recipe from the keys, a name of ``SCHEMAS`` or a schema class names it, None skips the check). A refused
    key or value raises :class:`~peft_tensor.training.schema.ConfigError` (a ``ValueError``)."""
    from .schema import validate_config

    return validate_config(apply_overrides(_load_raw(name_or_path, search), overrides), schema)


def _load_raw(name_or_path: str | os.PathLike, search: Iterable[str | os.PathLike] | None = None) -> dict:
    search = list(search or ())
    path = config_path(name_or_path, search)
    cfg = load_yaml(path.read_text()) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold a YAML mapping, found {type(cfg).__name__}")
    base = cfg.pop("base", None)
    if base:  # a config may start from another one and change a few keys
        cfg = _merge(_load_raw(base, search=[path.parent, *search]), cfg)
    return cfg


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def dump_config(cfg: dict, header: str = "") -> str:
    """YAML text of a resolved config (key order kept), optionally after ``# header`` comment lines."""
    import yaml

    lines = "".join(f"# {ln}\n" if ln else "#\n" for ln in header.splitlines())
    return lines + yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None, width=119)


def parse_recipe_args(argv=None, default_config: str | None = None, description: str = "",
                      search: Iterable[str | os.PathLike] | None = None, schema: str | type | None = "auto",
                      exit_on_error: bool = True) -> dict:
    """``--config NAME_OR_PATH`` plus ``key.sub=value`` overrides -> the config dict (recipes' command line),
    checked against ``schema`` (see :func:`load_config`). A refused config ends the process with a one-line
    ``error:`` message (exit status 2, as argparse does) unless ``exit_on_error`` is false: then it raises."""
    import argparse

    from .schema import ConfigError

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config, required=default_config is None,
                        help="config name (see `peft-tensor list`) or a YAML path")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=50 arm.name=lora")
    args = parser.parse_intermixed_args(argv)
    try:
        return load_config(args.config, args.overrides, search=search, schema=schema)
    except (ConfigError, FileNotFoundError) as exc:
        if not exit_on_error:
            raise
        parser.exit(2, f"{parser.prog}: error: {exc}\n")


def run_recipe(main, argv=None, **parse_kwargs):
    """A recipe script's entry point: ``main(parse_recipe_args(argv, **parse_kwargs))``, where an error of the config
    -- refused by the schema, or raised while a config block is read (attributed with
    :func:`~peft_tensor.training.schema.config_block`: the data, the model, the arm) -- ends the process with one
    ``<prog>: error: <block>: ...`` line and exit status 1, as ``peft-tensor run`` prints it, instead of a traceback.
    Other errors keep their traceback."""
    import sys

    from ..cli import error_line
    from .schema import ConfigError

    cfg = parse_recipe_args(argv, **parse_kwargs)
    try:
        return main(cfg)
    except Exception as exc:  # noqa: BLE001 - only the config's errors are folded into one line
        if not (isinstance(exc, ConfigError) or getattr(exc, "config_block", None)):
            raise
        print(f"{Path(sys.argv[0]).name}: error: {error_line(exc)}", file=sys.stderr)
        raise SystemExit(1) from None


def patch_size(cfg: dict) -> tuple:
    """Training crop / inference window: ``train.patch`` or else the model's ``img_size`` (UNETR) or 96."""
    patch = get_dotted(cfg, "train.patch") or get_dotted(cfg, "model.img_size") or 96
    return tuple(int(p) for p in patch) if isinstance(patch, (list, tuple)) else (int(patch),) * 3


def total_steps(train_cfg: dict, n_train: int) -> int:
    """``train.steps`` if given, else ``train.epochs * ceil(n_train / batch_size)`` (the papers count epochs)."""
    import math

    from .schema import TrainConfig, fill_block

    train = fill_block(TrainConfig, train_cfg, "train")
    if train["steps"]:
        return int(train["steps"])
    if not train["epochs"]:
        raise ValueError("the config needs train.steps or train.epochs")
    return int(train["epochs"]) * math.ceil(n_train / int(train["batch_size"]))
