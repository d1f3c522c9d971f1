"""A wrong recipe config ends ``peft-tensor run`` / ``cat`` (and a recipe script) in one ``error:`` line that names
the config block at fault -- never a Python traceback (issue 21, item 4)."""

from __future__ import annotations

import sys

import pytest

from peft_tensor.cli import main

from tests._recipe_fixtures import pairs_dataset

# no training ever starts: every case fails while its block is read (stop_after is a guard all the same)
RUN = ["run", "finetune", "--config", "finetune_cpu", "progress=false", "train.stop_after=1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A three-case pairs dataset (32^3) in place of the embedded cohort, and a run folder."""
    root = tmp_path_factory.mktemp("cfgerr")
    pairs_dataset(root / "pairs", n=3, codes=(1,))
    return root


def _one_line(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_changing_data_kind_alone_says_to_replace_the_data_block(capsys, tmp_path):
    """The README's ``data.kind=msd data.root=...`` on a config written for the embedded cohort: the data block
    must be replaced, and the line shows the whole-block override that does it -- which then gets past the schema
    (the next error is the missing MSD folder itself, still one line naming the block)."""
    root = tmp_path / "Task04"
    for argv in ([*RUN, f"output_dir={tmp_path}", "data.kind=msd", f"data.root={root}"],
                 ["cat", "finetune_cpu", "data.kind=msd", f"data.root={root}"]):
        line = _one_line(capsys, argv)
        assert line.startswith(f"peft-tensor {argv[0]}: error: data: data.kind=msd does not take task, n_train"), line
        assert "(keys of data.kind=embedded)" in line and "replace the whole data block" in line
        assert f"data='{{kind: msd, root: {root}}}'" in line and "data.kind=msd takes classes, datalist" in line
    line = _one_line(capsys, [*RUN, f"output_dir={tmp_path}", f"data={{kind: msd, root: {root}}}"])
    assert line.startswith("peft-tensor run: error: data: ") and f"{root}/dataset.json not found" in line


@pytest.mark.parametrize("overrides, start", [
    (["train.stepz=5"], "train.stepz: unknown key; did you mean train.steps?"),
    (["train.batch_size=two"], "train.batch_size: expected int, got str 'two'"),
    (["data.n_train=abc"], "data.n_train: expected int, got str 'abc'"),  # was a TypeError deep in the cohort
    (["data.n_trian=3"], "data.n_trian: unknown key for data.kind=embedded; did you mean data.n_train?"),
    (["arm.name=foo"], "arm.name: unknown arm 'foo'; choose one of tcurlora"),
    (["device=tpu"], "device: 'tpu' is not a device; set device=auto, cpu, cuda or cuda:N"),  # ran on the CPU
    (["train.loss=focal"], "train.loss: 'focal' is not one of dice, dicece"),  # was refused after the data loaded
    (["optim.name=rmsprop"], "optim.name: 'rmsprop' is not one of adam, sgd"),
    (["train.steps"], "override 'train.steps' is not key=value"),
])
def test_schema_errors_are_one_line_naming_the_key(capsys, tmp_path, overrides, start):
    line = _one_line(capsys, [*RUN, f"output_dir={tmp_path}", *overrides])
    assert line.startswith(f"peft-tensor run: error: {start}"), line


def test_missing_config_file_is_one_line(capsys):
    line = _one_line(capsys, ["run", "finetune", "--config", "no_such_config.yaml"])
    assert "no config file or config named 'no_such_config.yaml'; known: " in line


@pytest.mark.parametrize("overrides, start, says", [
    (["data={kind: pairs, root: /nonexistent/pairs}"], "data: ", "dataset folder /nonexistent/pairs does not exist"),
    (["model.pretrained=/nonexistent/backbone"], "model.pretrained: ", "/nonexistent/backbone does not exist"),
    (["model.pretrained=null", "model.hidden_size=97"], "model: ", "hidden_size should be divisible by num_heads"),
    (["model={_target_: monai.networks.nets.SegResNet, nope: 3}"], "model: ", "unexpected keyword argument 'nope'"),
    (["model.pretrained=null", "arm.r=abc"], "arm: ", "r must be a positive integer, got 'abc'"),
])
def test_errors_while_a_block_is_read_name_the_block(capsys, tiny, overrides, start, says):
    """Errors raised by the data loader, the network's constructor, the weights loader or the arm -- any type --
    come out as one line prefixed with the block they were reading."""
    data = f"data={{kind: pairs, root: {tiny / 'pairs'}}}"
    line = _one_line(capsys, [*RUN, f"output_dir={tiny / 'run'}", data, *overrides])
    assert line.startswith(f"peft-tensor run: error: {start}") and says in line, line


def test_recipe_script_prints_one_line_too(tmp_path, capsys, monkeypatch):
    """A recipe run as a script (its ``__main__``: :func:`~peft_tensor.training.config.run_recipe`, what
    ``--nproc`` and copied recipes run) ends the same way, exit status 1: here the run folder cannot be created (a
    file is in the way)."""
    from peft_tensor.recipes import finetune
    from peft_tensor.training.config import run_recipe

    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(sys, "argv", ["finetune.py"])
    with pytest.raises(SystemExit) as stop:
        run_recipe(finetune.main, ["--config", "finetune_cpu", f"output_dir={tmp_path / 'file' / 'run'}"],
                   default_config="finetune_cpu", schema="finetune")
    assert stop.value.code == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("finetune.py: error: output_dir: "), err
    assert "Not a directory" in lines[0] or "File exists" in lines[0]
