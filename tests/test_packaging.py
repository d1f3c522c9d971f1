"""The wheel's layout: the package list in pyproject.toml covers the source tree, the top-level recipes/ folder
ships as ``peft_tensor.recipes`` (no bare ``recipes`` package, no symbolic links), templates ship as package data."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _setuptools() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_package_list_covers_every_package_folder():
    found = {".".join(p.relative_to(REPO).parts[:-1]) for p in (REPO / "peft_tensor").rglob("__init__.py")}
    listed = set(_setuptools()["packages"])
    assert listed == found | {"peft_tensor.recipes"}, "update [tool.setuptools] packages in pyproject.toml"
    assert not any(name == "recipes" or name.startswith(("recipes.", "benchmarks", "tests")) for name in listed)


def test_recipes_ship_through_package_dir_with_their_configs():
    st = _setuptools()
    assert st["package-dir"] == {"peft_tensor.recipes": "recipes"}
    assert (REPO / "recipes" / "__init__.py").is_file() and not (REPO / "peft_tensor" / "recipes").exists()
    assert "configs/*.yaml" in st["package-data"]["peft_tensor.recipes"]
    assert "hub/templates/*.md" in st["package-data"]["peft_tensor"]
    assert (REPO / "peft_tensor" / "hub" / "templates" / "adapter_card.md").is_file()


def test_no_symbolic_links_in_the_source_tree():
    links = [str(Path(root, name).relative_to(REPO)) for folder in ("peft_tensor", "recipes", "benchmarks")
             for root, dirs, files in os.walk(REPO / folder) for name in dirs + files if Path(root, name).is_symlink()]
    assert links == []
