"""The library does not depend on the application.

Library: ``peft_tensor`` itself (``__init__``, ``registry``, ``loading``, ``errors``, ...), ``algebra``, ``tuners``,
``hub`` and ``networks``. Application: ``training``, ``data``, ``analysis``, ``cli``, the recipes
(``peft_tensor.recipes``) and the benchmarks. The application imports the library, never the other way round: checked
statically (every import statement, including those inside functions) and at run time (importing the whole library
loads no application module)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PKG = REPO / "peft_tensor"
APPLICATION = ("peft_tensor.training", "peft_tensor.data", "peft_tensor.analysis", "peft_tensor.cli",
               "peft_tensor.recipes", "recipes", "benchmarks")
LIBRARY_DIRS = ("algebra", "tuners", "hub", "networks")


def _library_files() -> list[Path]:
    top = [p for p in PKG.glob("*.py")]
    return sorted(top + [p for d in LIBRARY_DIRS for p in (PKG / d).rglob("*.py")])


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            found.append((node.lineno, name))
            found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
    return found


def _is_application(name: str) -> bool:
    return any(name == app or name.startswith(app + ".") for app in APPLICATION)


def test_library_source_imports_no_application_module():
    offending = [f"{path.relative_to(REPO)}:{line} imports {name}" for path in _library_files()
                 for line, name in _imports(path) if _is_application(name)]
    assert offending == []


def test_importing_the_library_loads_no_application_module():
    library = sorted({_module_name(p) for p in _library_files()})
    code = ("import importlib, sys\n"
            f"for name in {library!r}:\n"
            "    importlib.import_module(name)\n"
            "print('\\n'.join(sorted(sys.modules)))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = [m for m in proc.stdout.split() if _is_application(m)]
    assert loaded == []


def test_the_check_sees_relative_and_lazy_imports(tmp_path):
    path = PKG / "hub" / "load.py"
    names = {name for _, name in _imports(path)}
    assert "peft_tensor.loading" in names and "peft_tensor.errors.AdapterLoadError" in names
    assert "peft" in names  # a function-level import
