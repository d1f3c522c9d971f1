"""``peft-tensor list | copy | cat | run | demo``: the recipes' command line (torchtune's manner).

* ``list`` -- recipes, packaged configs and the registered PEFT methods;
* ``copy <recipe-or-config> <dest>`` -- a copy to edit and run (``python my_finetune.py --config my.yaml``); a
  config is written fully resolved (its ``base:`` chain merged), so the copy stands on its own;
* ``cat <config> [key=value ...]`` -- print the fully resolved config, checked against its recipe's schema and
  with every default filled in (:mod:`peft_tensor.training.schema`);
* ``run <recipe> --config <name-or-path> [key=value ...] [--nproc N]`` -- run in this process, or with N
  processes through torchrun (gloo on CPU, NCCL on GPUs);
* ``demo`` -- the one-command demo (embedded data, pretrain, tCURLoRA vs baselines, results table).
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import peft_tensor.recipes
from peft_tensor._atomic import atomic_write, atomic_write_text
from peft_tensor.recipes import RECIPES, RENAMED

RECIPE_DIR = Path(peft_tensor.recipes.__file__).resolve().parent
TRUST_REMOTE_CODE_HELP = (
    "allow untrusted classes and constructor arguments that read files or URLs (pretrained_url, cache_dir, ...) in "
    "the network configs the run loads (model.pretrained: bundles, peft_tensor.json, backbone.json) -- only for "
    "sources you trust")
CONFIG_DIR = RECIPE_DIR / "configs"


def _first_comment(path: Path) -> str:
    return next((ln.lstrip("# ").strip() for ln in path.read_text().splitlines() if ln.startswith("#")), "")


def _recipe_name(name: str) -> str | None:
    name = RENAMED.get(name, name)
    return name if name in RECIPES else None


def _list(args) -> int:
    from peft_tensor.registry import methods
    from peft_tensor.training.arms import ARMS

    print("Recipes (peft-tensor run <recipe> --config <config>):")
    for name, doc in RECIPES.items():
        print(f"  {name:<14} {doc}")
    print("\nConfigs (peft-tensor cat <config> prints one resolved):")
    for cfg in sorted(CONFIG_DIR.glob("*.yaml")):
        print(f"  {cfg.stem:<34} {_first_comment(cfg)}")
    print("\nPEFT methods (peft_tensor.registry):")
    for spec in methods().values():
        print(f"  {spec.name:<14} {spec.summary} [{spec.paper}]")
    print(f"\nArms (arm.name=...): {', '.join(ARMS)}")
    return 0


def _copy(args) -> int:
    from peft_tensor.training.config import config_path, dump_config, load_config

    recipe = _recipe_name(args.name)
    src = RECIPE_DIR / f"{recipe}.py" if recipe else config_path(args.name)
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / src.name
    if dest.is_symlink() and not args.force:  # dangling or not: exists() follows the link, so test it first
        raise FileExistsError(f"{dest} exists as a symbolic link (to {os.readlink(dest)}); use --force to replace "
                              "the link itself with the copy (its target is left untouched), or choose another name")
    if dest.exists() and not args.force:
        raise FileExistsError(f"{dest} exists (use --force to overwrite)")
    # atomic writes: --force replaces a symbolic link at dest, never writes through it
    if recipe or "base" not in (_read_yaml(src) or {}):
        atomic_write(dest, lambda tmp: shutil.copyfile(src, tmp))  # keeps the comments
    else:
        header = f"{_first_comment(src)}\nResolved from {src.name} (its base: chain merged) by `peft-tensor copy`."
        atomic_write_text(dest, dump_config(load_config(src), header))
    print(f"copied {src.name} -> {dest}")
    return 0


def _read_yaml(path: Path):
    from peft_tensor._safe_yaml import load_yaml

    return load_yaml(path.read_text())


def _cat(args) -> int:
    from peft_tensor.training.config import dump_config, load_config

    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def _run_parser():
    p = argparse.ArgumentParser(prog="peft-tensor run <recipe>")
    p.add_argument("--config", help="packaged config name or YAML path (default: the recipe's own)")
    p.add_argument("--nproc", type=int, default=1, help="processes (torchrun; gloo on CPU, NCCL on GPU)")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=50 arm.name=lora")
    return p


def _run(args) -> int:
    given = args.recipe
    recipe = _recipe_name(given)
    args = _run_parser().parse_intermixed_args(args.rest)
    script = RECIPE_DIR / f"{recipe}.py" if recipe else Path(given)
    if recipe is None and not script.is_file():
        raise FileNotFoundError(f"no recipe {given!r}; see `peft-tensor list` (or give a path to a copied recipe)")
    argv = (["--config", args.config] if args.config else []) + list(args.overrides)
    # packaged recipes run as modules, so that no recipe folder lands on sys.path
    target = ["-m", f"peft_tensor.recipes.{recipe}"] if recipe else [str(script)]
    # --trust-remote-code in a subprocess: the recipe runs inside trusting_remote_code() (peft_tensor.cli.trusted_run)
    trusted = ["-m", "peft_tensor.cli.trusted_run"] if args.trust_remote_code else []
    if args.nproc and args.nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               *trusted, *target, *argv]
        return subprocess.call(cmd)
    if recipe:
        from peft_tensor.hub.provenance import trusting_remote_code

        mod = importlib.import_module(f"peft_tensor.recipes.{recipe}")
        from peft_tensor.training.config import parse_recipe_args

        cfg = parse_recipe_args(argv, getattr(mod, "DEFAULT_CONFIG", None) or f"{recipe}_cpu", schema=recipe,
                                exit_on_error=False)  # a refused config: one `error:` line, exit status 1
        with trusting_remote_code(args.trust_remote_code):
            mod.main(cfg)
        return 0
    return subprocess.call([sys.executable, *trusted, *target, *argv])


def _demo(args) -> int:
    from peft_tensor.recipes import demo
    from peft_tensor.training.config import load_config

    overrides = list(args.overrides)
    if args.output:
        overrides.append(f"output_dir={args.output}")
    if args.fresh:
        overrides.append("reuse_pretrained=false")

    demo.main(load_config(args.config, overrides, schema="demo"))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("list", help="list recipes, packaged configs, methods and arms")
    p.set_defaults(func=_list)

    p = subparsers.add_parser("copy", help="copy a recipe or config (written fully resolved) to edit it")
    p.add_argument("name", help="recipe name (e.g. finetune) or config name / path (e.g. finetune_cpu)")
    p.add_argument("dest", help="destination file or folder")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=_copy)

    p = subparsers.add_parser("cat", help="print a config fully resolved (base: chain merged, overrides applied, "
                                          "checked, defaults filled in)")
    p.add_argument("config", help="config name (see `peft-tensor list`) or YAML path")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.set_defaults(func=_cat)

    p = subparsers.add_parser("run", help="run a recipe with a config and key=value overrides")
    p.add_argument("recipe", help="recipe name (see `peft-tensor list`) or path to a copied recipe script")
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="...",
                   help="[--config NAME_OR_PATH] [--nproc N] [key.sub=value ...]")
    p.set_defaults(func=_run)

    p = subparsers.add_parser("demo", help="one-command demo on the embedded template-derived cohort (CPU, minutes)")
    p.add_argument("--config", default="demo", help="demo config (default: the packaged 'demo')")
    p.add_argument("--output", help="output folder (default: ./peft_tensor_demo)")
    p.add_argument("--fresh", action="store_true", help="pretrain again even if a cached backbone exists")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the demo config, e.g. --set finetune.train.steps=60 (repeatable)")
    p.set_defaults(func=_demo)
