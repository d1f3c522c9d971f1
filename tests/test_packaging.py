"""The wheel's layout: the package list in pyproject.toml covers the source tree, the top-level recipes/ and
model_cards/ folders ship as ``peft_tensor.recipes`` and ``peft_tensor.model_cards`` (no bare ``recipes`` /
``model_cards`` package, no symbolic links), their configs and card templates as package data."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from tests._optional import require

REPO = Path(__file__).resolve().parent.parent
MAPPED = {"peft_tensor.recipes": "recipes", "peft_tensor.model_cards": "model_cards"}
DATA_PACKAGES = {"peft_tensor.recipes.configs": "recipes/configs"}  # data only (no __init__.py), listed explicitly
CARD_TEMPLATES = ("adapter_card.md", "base_weights_card.md")


def _setuptools() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_package_list_covers_every_package_folder():
    found = {".".join(p.relative_to(REPO).parts[:-1]) for p in (REPO / "peft_tensor").rglob("__init__.py")}
    listed = set(_setuptools()["packages"])
    assert listed == found | set(MAPPED) | set(DATA_PACKAGES), "update [tool.setuptools] packages in pyproject.toml"
    assert not any(name in ("recipes", "model_cards") or name.startswith(("recipes.", "model_cards.", "benchmarks",
                                                                          "tests")) for name in listed)


def test_top_level_folders_ship_through_package_dir_with_their_data():
    st = _setuptools()
    assert st["package-dir"] == MAPPED
    for package, folder in MAPPED.items():
        assert (REPO / folder / "__init__.py").is_file()
        assert not (REPO / package.replace(".", "/")).exists()  # no second copy inside peft_tensor/
    assert st["package-data"]["peft_tensor.recipes.configs"] == ["*.yaml"]
    assert "peft_tensor.recipes" not in st["package-data"]  # the configs are their own (data) package
    for folder in DATA_PACKAGES.values():
        assert (REPO / folder).is_dir() and not (REPO / folder / "__init__.py").exists()
    assert st["package-data"]["peft_tensor.model_cards"] == ["*.md"]
    assert sorted(p.name for p in (REPO / "model_cards").glob("*.md")) == sorted(CARD_TEMPLATES)
    assert not (REPO / "peft_tensor" / "hub" / "templates").exists()
    assert "include model_cards/*.md" in (REPO / "MANIFEST.in").read_text().splitlines()


def test_wheel_ships_the_card_templates_readable_through_importlib_resources(tmp_path):
    """Build the wheel, unpack it as an install would, and read both templates with importlib.resources."""
    require(("setuptools",), "pip install 'setuptools>=77'")  # the build backend (--no-build-isolation)
    src = tmp_path / "src"  # a copy: building in the checkout would leave build/ there, whose stale files leak
    src.mkdir()
    for name in ("pyproject.toml", "MANIFEST.in", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for folder in ("peft_tensor", *MAPPED.values()):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert "absent from the `packages` configuration" not in build.stdout + build.stderr  # nothing it would drop
    (wheel,) = (tmp_path / "dist").glob("peft_tensor-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(site)
    for name in CARD_TEMPLATES:
        assert f"peft_tensor/model_cards/{name}" in names
    configs = sorted(p.name for p in (REPO / "recipes" / "configs").glob("*.yaml"))
    assert configs and all(f"peft_tensor/recipes/configs/{name}" in names for name in configs)
    assert not any(n.startswith(("model_cards/", "peft_tensor/hub/templates/")) for n in names)
    code = ("import hashlib, importlib.resources as r, peft_tensor\n"
            f"assert peft_tensor.__file__.startswith({str(site)!r}), peft_tensor.__file__\n"
            f"for name in {CARD_TEMPLATES!r}:\n"
            "    print(name, hashlib.sha256((r.files('peft_tensor.model_cards') / name).read_bytes()).hexdigest())\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    expected = "".join(f"{name} {hashlib.sha256((REPO / 'model_cards' / name).read_bytes()).hexdigest()}\n"
                       for name in CARD_TEMPLATES)
    assert run.stdout == expected


def test_cards_read_the_templates_of_model_cards():
    from peft_tensor.hub import cards

    for name in CARD_TEMPLATES:
        assert cards.template_text(name) == (REPO / "model_cards" / name).read_text(encoding="utf-8")


def test_no_symbolic_links_in_the_source_tree():
    links = [str(Path(root, name).relative_to(REPO)) for folder in ("peft_tensor", "recipes", "benchmarks")
             for root, dirs, files in os.walk(REPO / folder) for name in dirs + files if Path(root, name).is_symlink()]
    assert links == []
