"""The ``peft-tensor`` command line.

Each sub-package contributes its subcommands through a ``register(subparsers)`` function listed in
``_COMMAND_MODULES``; a module whose optional dependencies are missing is skipped with a note in ``--help``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

_COMMAND_MODULES = (
    "peft_tensor.cli.hub",  # push, info, load
    "peft_tensor.cli.recipes",  # list, copy, cat, run, demo
    "peft_tensor.cli.export",  # export (merged network as a MONAI bundle)
)


def error_line(exc: BaseException) -> str:
    """``exc`` as one line for a command line's ``error:``: its message with line breaks folded, prefixed by the
    config block it is attributed to (``peft_tensor.training.schema.config_block``) unless the message already
    starts with that key, and by its type where the type says what the message does not (``TypeError``,
    ``KeyError``, ...)."""
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    msg = " ".join(line.strip() for line in str(text).splitlines() if line.strip()) or type(exc).__name__
    if not isinstance(exc, (ValueError, OSError, RuntimeError)) and not msg.startswith(type(exc).__name__):
        msg = f"{type(exc).__name__}: {msg}"
    block = getattr(exc, "config_block", None)
    if block and not msg.startswith((f"{block}:", f"{block}.", f"{block}=", f"{block} ")):
        msg = f"{block}: {msg}"
    return msg


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peft-tensor",
        description="Tensor-decomposition PEFT for 3D medical imaging (tCURLoRA, LoRA-PT, HyPS).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    unavailable = []
    for mod_name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as exc:  # an optional dependency (the recipes extra) is not installed
            group = mod_name.rsplit(".", 1)[-1]
            unavailable.append(f"{group} (missing {exc.name}; pip install 'peft-tensor[recipes]')")
            continue
        mod.register(sub)
    if unavailable:
        parser.epilog = "Unavailable command groups: " + "; ".join(unavailable)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # pragma: no cover
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - errors of the user's input: one line; anything else: its traceback
        if not (isinstance(exc, (ValueError, RuntimeError, OSError)) or getattr(exc, "config_block", None)):
            raise
        print(f"peft-tensor {args.command}: error: {error_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
