"""``peft-tensor list | copy | run | demo``: the recipes' command line (torchtune's manner).

* ``list`` -- recipes and packaged configs;
* ``copy <recipe-or-config> <dest>`` -- a copy to edit and run (``python my_finetune.py --config my.yaml``);
* ``run <recipe> --config <name-or-path> [key=value ...] [--nproc N]`` -- run in this process, or with N
  processes through torchrun (gloo on CPU, NCCL on GPUs);
* ``demo`` -- the one-command demo (embedded data, pretrain, tCURLoRA vs baselines, results table).
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import subprocess
import sys
from pathlib import Path

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"
CONFIG_DIR = RECIPE_DIR / "configs"


def _recipes() -> dict:
    from peft_tensor.recipes import RECIPES

    return RECIPES


def _list(args) -> int:
    print("Recipes (peft-tensor run <recipe> --config <config>):")
    for name, doc in _recipes().items():
        print(f"  {name:<10} {doc}")
    print("\nConfigs:")
    for cfg in sorted(CONFIG_DIR.glob("*.yaml")):
        first = next((ln.lstrip("# ").strip() for ln in cfg.read_text().splitlines() if ln.startswith("#")), "")
        print(f"  {cfg.stem:<34} {first}")
    return 0


def _source(name: str) -> Path:
    if name in _recipes():
        return RECIPE_DIR / f"{name}.py"
    for cand in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"no recipe or config named {name!r}; see `peft-tensor list`")


def _copy(args) -> int:
    src = _source(args.name)
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / src.name
    if dest.exists() and not args.force:
        raise FileExistsError(f"{dest} exists (use --force to overwrite)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    print(f"copied {src.name} -> {dest}")
    return 0


def _run_parser():
    import argparse

    p = argparse.ArgumentParser(prog="peft-tensor run <recipe>")
    p.add_argument("--config", help="packaged config name or YAML path (default: <recipe>_cpu)")
    p.add_argument("--nproc", type=int, default=1, help="processes (torchrun; gloo on CPU, NCCL on GPU)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=50 arm.name=lora")
    return p


def _run(args) -> int:
    recipe = args.recipe
    args = _run_parser().parse_intermixed_args(args.rest)
    if recipe not in _recipes() and not Path(recipe).is_file():
        raise FileNotFoundError(f"no recipe {recipe!r}; see `peft-tensor list` (or give a path to a copied recipe)")
    script = RECIPE_DIR / f"{recipe}.py" if recipe in _recipes() else Path(recipe)
    argv = (["--config", args.config] if args.config else []) + list(args.overrides)
    if args.nproc and args.nproc > 1:
        # packaged recipes run as modules: a script's folder on sys.path would let recipes/evaluate.py shadow the
        # `evaluate` package that transformers probes for
        target = ["-m", f"peft_tensor.recipes.{recipe}"] if recipe in _recipes() else [str(script)]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               *target, *argv]
        return subprocess.call(cmd)
    if recipe in _recipes():
        mod = importlib.import_module(f"peft_tensor.recipes.{recipe}")
        from peft_tensor.training.config import parse_recipe_args

        cfg = parse_recipe_args(argv, getattr(mod, "DEFAULT_CONFIG", None) or f"{recipe}_cpu")
        mod.main(cfg)
        return 0
    return subprocess.call([sys.executable, str(script), *argv])


def _demo(args) -> int:
    from peft_tensor.recipes import demo


    overrides = list(args.overrides)
    if args.output:
        overrides.append(f"output_dir={args.output}")
    if args.fresh:
        overrides.append("reuse_pretrained=false")
    from peft_tensor.training.config import load_config

    demo.main(load_config(args.config, overrides))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("list", help="list recipes and packaged configs")
    p.set_defaults(func=_list)

    p = subparsers.add_parser("copy", help="copy a recipe or config to edit it")
    p.add_argument("name", help="recipe name (e.g. finetune) or config name (e.g. finetune_cpu)")
    p.add_argument("dest", help="destination file or folder")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=_copy)

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
