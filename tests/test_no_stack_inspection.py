"""The library never inspects the call stack to decide what to do (``sys._getframe``, ``inspect.stack`` and friends):
behaviour that depends on who the caller is lives in explicit contexts instead (e.g. deferred initialisation during
a load: ``peft_tensor.tuners._loading_context.loading_adapter``). Checked statically over every source file of the
package, like ``tests/test_layering.py``."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "peft_tensor"
FORBIDDEN = {"sys": {"_getframe", "_current_frames"}, "inspect": {"stack", "currentframe", "getouterframes", "trace"}}


def _offences(path: Path, root: Path = PKG.parent) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.attr in FORBIDDEN.get(node.value.id, ()):
                found.append(f"{path.relative_to(root)}:{node.lineno} {node.value.id}.{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module in FORBIDDEN and not node.level:
            found += [f"{path.relative_to(root)}:{node.lineno} from {node.module} import {a.name}"
                      for a in node.names if a.name in FORBIDDEN[node.module]]
    return found


def test_the_scan_sees_what_it_looks_for(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import sys, inspect\nsys._getframe(1)\ninspect.stack()\nfrom inspect import currentframe\n")
    assert len(_offences(sample, tmp_path)) == 3


def test_package_source_never_walks_the_call_stack():
    files = sorted(PKG.rglob("*.py"))
    assert len(files) > 20
    offending = [o for path in files for o in _offences(path)]
    assert offending == []
