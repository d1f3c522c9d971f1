"""The documentation's code runs as written: README.md's usage example, and the end-to-end section of
docs/recipes.md, "From your pretrained network to a shared adapter"."""

from pathlib import Path

import pytest

from tests._docs import ROOT, blocks

USAGE = ("README.md", "## Usage")


def test_readme_usage_example_runs(tmp_path, monkeypatch):
    code = blocks(*USAGE)
    assert len(code) == 1, "README.md's Usage section holds one python block"
    monkeypatch.chdir(tmp_path)
    exec(compile(code[0], "README.md: Usage", "exec"), {"__name__": "__readme__"})
    assert (tmp_path / "my_adapter" / "adapter_model.safetensors").is_file()


# ------------------------------------------------------- docs/recipes.md: "From your pretrained network ..."
START_SECTION = ("docs/recipes.md", "## From your pretrained network to a shared adapter")
SIZES_LINE = "PATCH, STEPS = 96, 300"
ADAPTER_REPO, BASE_REPO = "your-name/unetr-tcurlora-hippocampus", "your-name/unetr-hippocampus-base"
X_SEED = 11


def _tiny_bundle(folder: Path, size: int) -> None:
    """A MONAI bundle as the model zoo ships it: configs/inference.json (network_def) + models/model.pt (a pickled
    state dict, read with weights_only=True); a 14-class head, as a BTCV model would have."""
    import json

    import torch
    from monai.networks.nets import UNETR

    netdef = {"_target_": "UNETR", "in_channels": 1, "out_channels": 14, "img_size": [size] * 3, "feature_size": 8,
              "hidden_size": 96, "mlp_dim": 192, "num_heads": 4, "proj_type": "conv", "norm_name": "instance"}
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    (folder / "configs" / "inference.json").write_text(json.dumps({"network_def": netdef}))
    torch.manual_seed(0)
    torch.save(UNETR(**{k: v for k, v in netdef.items() if k != "_target_"}).state_dict(),
               folder / "models" / "model.pt")


def _env(hub, tmp: Path, cache: str = "hf-cache") -> dict:
    """A fresh process's environment: huggingface_hub pointed at the local server (as a user sets HF_ENDPOINT)."""
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(hub.client_env(str(tmp / cache), HF_TOKEN="hf_readme_test_token"))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    """The section run as written (its sizes line aside: 32^3 patches, 2 steps) on a tiny UNETR bundle and four
    synthetic MSD cases, in this process with huggingface_hub pointed at a local Hub server: the python block, then
    each ``peft-tensor`` command of the bash block through the console script's function (``peft_tensor.cli.main``).
    Yields (folder, the blocks' stdout, hub). The fresh-process check is
    :func:`test_pushed_adapter_rebuilds_by_repo_id_in_fresh_process`.
    """
    import contextlib
    import io
    import os
    import shlex

    from peft_tensor.cli import main as cli

    from tests._recipe_fixtures import msd_dataset
    from tests.hub.hub_server import HubServer
    from tests.hub.test_hub import _client_constants

    python, bash = blocks(*START_SECTION), blocks(*START_SECTION, lang="bash")
    assert len(python) == 1 and len(bash) == 1, "the section holds one python and one bash block"
    assert python[0].count(SIZES_LINE) == 1, f"the test replaces {SIZES_LINE!r}; keep it"
    code = python[0].replace(SIZES_LINE, "PATCH, STEPS = 32, 2")
    tmp = tmp_path_factory.mktemp("pretrained-flow")
    _tiny_bundle(tmp / "my_bundle", 32)
    msd_dataset(tmp / "Task04_Hippocampus", n=4)
    out, cwd = io.StringIO(), os.getcwd()
    commands = [line for line in bash[0].splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert commands and all(c.startswith("peft-tensor ") for c in commands), commands
    with HubServer() as hub:
        with _client_constants(hub, tmp / "hf-home"), contextlib.redirect_stdout(out):
            os.chdir(tmp)
            try:
                exec(compile(code, "docs/recipes.md: From your pretrained", "exec"), {"__name__": "__readme__"})
                for command in commands:
                    assert cli(shlex.split(command, comments=True)[1:]) == 0, command
            finally:
                os.chdir(cwd)
        yield tmp, out.getvalue(), hub


def test_start_from_your_pretrained_network_runs(flow):
    import json

    tmp, stdout, hub = flow
    assert "mismatched      2" in stdout and "out.conv.conv.weight (14, 8, 1, 1, 1) vs (3, 8, 1, 1, 1)" in stdout
    results = json.loads((tmp / "runs" / "hippocampus" / "results.json").read_text())
    assert results["classes"] == ["anterior", "posterior"]
    for name in results["classes"]:
        assert f"{name}: Dice" in stdout and name in results["test_per_class"]
    assert "adapter_model.safetensors" in hub.files(ADAPTER_REPO) and "model.safetensors" in hub.files(BASE_REPO)
    for rel in ("configs/inference.json", "configs/metadata.json", "models/model.pt", "models/model.ts"):
        assert (tmp / "hippocampus_bundle" / rel).is_file(), rel


def test_recipe_adapter_is_ready_to_share(flow):
    """The run's adapter folder as written (provenance, our card) and as pushed (the base repo named everywhere)."""
    import json

    from huggingface_hub import ModelCard

    from peft_tensor.hub import adapter_info, format_info

    tmp, _, hub = flow
    adapter = tmp / "runs" / "hippocampus" / "adapter"
    base = json.loads((adapter / "peft_tensor.json").read_text())["base_network"]
    assert base["class"] == "monai.networks.nets.UNETR" and base["kwargs"]["out_channels"] == 3
    assert base["source"] == "my_bundle"
    # the bundle's model.pt is a pickle format, with a 14-class head: the run's own base weights are written
    assert base["weights"]["path"] == "../base/model.safetensors"  # in the run folder: relative to the record
    info = format_info(adapter_info(adapter))
    assert "not recorded" not in info and "monai.networks.nets.UNETR(" in info

    local = ModelCard((adapter / "README.md").read_text())
    assert "Model Card for Model ID" not in local.text and "Fine-tuning run" in local.text
    for row in ("| mean over classes |", "| anterior |", "| posterior |"):
        assert row in local.text, row
    files = hub.files(ADAPTER_REPO)
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == BASE_REPO
    pushed = json.loads(files["peft_tensor.json"])["base_network"]
    assert pushed["weights"]["repo_id"] == BASE_REPO and "path" not in pushed["weights"]
    assert str(tmp) not in files["peft_tensor.json"].decode()  # no local paths of the publisher's machine
    card, base_card = ModelCard(files["README.md"].decode()), ModelCard(hub.files(BASE_REPO)["README.md"].decode())
    data = card.data
    assert data.base_model == BASE_REPO and data.base_model_relation == "adapter"
    assert data.pipeline_tag == base_card.data.pipeline_tag == "image-segmentation"
    assert data.library_name == base_card.data.library_name == "peft-tensor"
    assert data.license == base_card.data.license == "cc-by-4.0"
    results = json.loads((tmp / "runs" / "hippocampus" / "results.json").read_text())
    dice = {r.metric_config: r.metric_value for r in data.eval_results if r.metric_type == "dice"}
    assert dice[None] == pytest.approx(results["test"]["dice"]["mean"])
    for name in ("anterior", "posterior"):
        assert dice[name] == pytest.approx(results["test_per_class"][name]["dice"]["mean"])


def test_pushed_adapter_rebuilds_by_repo_id_in_fresh_process(flow):
    """load_pretrained(repo id) in a fresh process with an empty cache -- network, base weights and adapter from the
    Hub -- gives the outputs of the run's model rebuilt here the recipes' way (bundle + adapter folder)."""
    import subprocess
    import sys

    import torch

    from peft_tensor.training import load_backbone, load_trained

    tmp, _, hub = flow
    base, _ = load_backbone(str(tmp / "my_bundle"), {"pretrained": str(tmp / "my_bundle"), "out_channels": 3})
    model = load_trained(base, tmp / "runs" / "hippocampus" / "adapter", "tcurlora").eval()
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(X_SEED))
    with torch.no_grad():
        torch.save(model(x), tmp / "expected.pt")
    code = f"""
import torch
from peft_tensor.hub import load_pretrained
from tests._numerics import UNETR_DEPTH, assert_float32_close
model = load_pretrained({ADAPTER_REPO!r})
x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed({X_SEED}))
with torch.no_grad():
    out = model(x)
expected = torch.load({str(tmp / 'expected.pt')!r}, weights_only=True)
# another process: MKL may split the reductions over other threads, so equal up to float32 rounding
assert_float32_close(out, expected, depth=UNETR_DEPTH)
print("REBUILT_OK", tuple(out.shape))
"""
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp, env=_env(hub, tmp, "fresh-cache"),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "REBUILT_OK (1, 3, 32, 32, 32)" in run.stdout
