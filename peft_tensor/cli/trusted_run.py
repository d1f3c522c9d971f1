"""``python -m peft_tensor.cli.trusted_run (-m MODULE | SCRIPT) [ARGS...]``: run a recipe module or script with
``trust_remote_code=True`` for the networks it loads (what ``peft-tensor run --trust-remote-code`` launches in a
subprocess or under torchrun). Only for sources you trust: network configs may then name any class and pass
constructor arguments that read files or URLs."""

from __future__ import annotations

import runpy
import sys


def main(argv: list[str] | None = None) -> None:
    from peft_tensor.hub.provenance import trusting_remote_code

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] == "-m" and len(argv) < 2:
        raise SystemExit("usage: python -m peft_tensor.cli.trusted_run (-m MODULE | SCRIPT) [ARGS...]")
    module = argv[1] if argv[0] == "-m" else None
    target, rest = (module, argv[2:]) if module else (argv[0], argv[1:])
    sys.argv = [target, *rest]
    with trusting_remote_code():
        if module:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(target, run_name="__main__")


if __name__ == "__main__":  # pragma: no cover
    main()
