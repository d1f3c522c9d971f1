"""``peft-tensor list | copy | run``: what the recipes' command line reads (registry, packaged recipes) and the
renamed ``evaluate`` recipe."""

from __future__ import annotations

import pytest

from peft_tensor.cli import main
from peft_tensor.cli.recipes import RECIPE_DIR
from peft_tensor.recipes import RECIPES, RENAMED
from peft_tensor.registry import methods


def test_list_reads_the_recipes_the_configs_and_the_registry(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in RECIPES:
        assert f"  {name} " in out and (RECIPE_DIR / f"{name}.py").is_file()
    for spec in methods().values():
        assert f"  {spec.name} " in out and spec.paper in out
    assert "finetune_cpu" in out and "pretrain_cpu" in out and "Arms (arm.name=...): tcurlora" in out


def test_renamed_recipe_still_runs_and_copies(tmp_path, capsys):
    assert RENAMED == {"evaluate": "evaluate_run"} and not (RECIPE_DIR / "evaluate.py").exists()
    assert main(["copy", "evaluate", str(tmp_path)]) == 0
    assert (tmp_path / "evaluate_run.py").read_text() == (RECIPE_DIR / "evaluate_run.py").read_text()
    with pytest.raises(SystemExit):  # argparse --help of the recipe's own parser: it was found
        main(["run", "evaluate", "--help"])
    assert "usage: peft-tensor run <recipe>" in capsys.readouterr().out


def test_unknown_recipe_is_a_clear_error(capsys):
    assert main(["run", "no_such_recipe"]) == 1
    assert "no recipe 'no_such_recipe'; see `peft-tensor list`" in capsys.readouterr().err
