"""Every adapter a recipe writes is ready to share as it stands (issue 11, section 6).

The finetune recipe runs 2 steps on a tiny MSD-layout folder (two classes) from a saved backbone; its ``adapter/``
folder must carry provenance and our card, push to the local Hub server, and rebuild by repo id in a fresh process
with the run's outputs.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from huggingface_hub import ModelCard

from peft_tensor.hub import adapter_info, format_info, push_to_hub
from peft_tensor.hub.cards import LIBRARY_NAME, eval_results_from_summary, results_table

from tests._recipe_fixtures import TINY_MODEL, msd_dataset
from .hub_server import HubServer
from .test_hub import _client_constants, _run

X_SEED = 7


@pytest.fixture(scope="module")
def hub():
    with HubServer() as server:
        yield server


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """finetune recipe, tCURLoRA r=2, 2 steps, batch 1, on a 4-case MSD folder (anterior / posterior)."""
    from peft_tensor.recipes import finetune
    from peft_tensor.training import load_config
    from peft_tensor.training.models import build_model, save_backbone

    tmp = tmp_path_factory.mktemp("recipe")
    model_cfg = dict(TINY_MODEL, out_channels=3)
    torch.manual_seed(0)
    save_backbone(build_model(model_cfg), model_cfg, tmp / "backbone")
    cfg = load_config("finetune_cpu")
    cfg.update({"output_dir": str(tmp / "run"), "progress": False, "device": "cpu", "threads": None})
    cfg["data"] = {"kind": "msd", "root": str(msd_dataset(tmp / "msd", n=4)), "task_type": "multiclass"}
    cfg["model"] = dict(model_cfg, pretrained=str(tmp / "backbone"))
    cfg["arm"] = {"name": "tcurlora", "r": 2}
    cfg["train"].update({"steps": 2, "batch_size": 1, "checkpoint_every": 0, "val_every": 0, "amp": False})
    cfg["eval"] = {"overlap": 0.0}
    cfg["card"] = {"license": "cc-by-4.0"}
    result = finetune.main(cfg)
    return tmp, cfg, result


def _expected_outputs(tmp, cfg) -> torch.Tensor:
    """The run's model rebuilt the recipes' own way (backbone + adapter folder), on a fixed input."""
    from peft_tensor.training import load_backbone, load_trained

    base, _ = load_backbone(cfg["model"]["pretrained"], cfg["model"])
    model = load_trained(base, tmp / "run" / "adapter", "tcurlora").eval()
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(X_SEED))
    with torch.no_grad():
        return model(x)


def test_recipe_adapter_carries_provenance_and_card(run):
    tmp, cfg, result = run
    adapter = tmp / "run" / "adapter"
    record = json.loads((adapter / "peft_tensor.json").read_text())
    base = record["base_network"]
    assert base["class"] == "monai.networks.nets.UNETR" and base["kwargs"]["out_channels"] == 3
    assert base["weights"]["path"] == str((tmp / "backbone" / "model.safetensors").resolve())  # referenced, not copied
    assert base["source"] == str(tmp / "backbone")
    assert not (tmp / "run" / "base").exists()

    info = format_info(adapter_info(adapter))
    assert "not recorded" not in info and "monai.networks.nets.UNETR(" in info

    card = ModelCard((adapter / "README.md").read_text())
    assert "Model Card for Model ID" not in card.text  # not PEFT's stock card
    data = card.data
    assert data.library_name == LIBRARY_NAME and data.pipeline_tag == "image-segmentation"
    assert data.license == "cc-by-4.0" and "tcurlora" in data.tags and "peft" in data.tags
    assert data.base_model is None  # the base weights are not on the Hub yet
    assert result["classes"] == ["anterior", "posterior"]
    dice = {r.metric_config: r.metric_value for r in data.eval_results if r.metric_type == "dice"}
    assert set(dice) == {None, "anterior", "posterior"}
    assert dice[None] == pytest.approx(result["test"]["dice"]["mean"])
    assert dice["posterior"] == pytest.approx(result["test_per_class"]["posterior"]["dice"]["mean"])
    for needle in ("| mean over classes |", "| anterior |", "| posterior |", "Fine-tuning run", "MSD Task04"):
        assert needle in str(card), needle


def test_push_recipe_adapter_then_rebuild_by_repo_id_in_fresh_process(hub, run, tmp_path):
    tmp, cfg, _ = run
    adapter = tmp / "run" / "adapter"
    local_config = (adapter / "adapter_config.json").read_bytes()
    torch.save(_expected_outputs(tmp, cfg), tmp_path / "expected.pt")
    with _client_constants(hub, tmp_path / "home"):
        push_to_hub(adapter, "lab/msd-tcurlora", base_weights_repo="lab/unetr-tiny-base")
    assert (adapter / "adapter_config.json").read_bytes() == local_config  # the local folder is never modified

    files = hub.files("lab/msd-tcurlora")
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == "lab/unetr-tiny-base"
    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == "lab/unetr-tiny-base" and card.data.base_model_relation == "adapter"
    base_card = ModelCard(hub.files("lab/unetr-tiny-base")["README.md"].decode())
    assert base_card.data.library_name == card.data.library_name == LIBRARY_NAME  # one library_name on both
    assert base_card.data.license == "cc-by-4.0" and base_card.data.pipeline_tag == "image-segmentation"

    code = f"""
import torch
from peft_tensor.hub import load_pretrained
model = load_pretrained("lab/msd-tcurlora")
x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed({X_SEED}))
with torch.no_grad():
    out = model(x)
expected = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)
assert torch.equal(out, expected), (out - expected).abs().max()
print("REBUILT_OK", tuple(out.shape))
"""
    loaded = _run(code, hub.client_env(str(tmp_path / "fresh-cache")))
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert "REBUILT_OK (1, 3, 32, 32, 32)" in loaded.stdout


def test_card_results_with_and_without_per_class_keys():
    stat = lambda m: {"mean": m, "std": 0.01, "n": 4}  # noqa: E731
    binary = {"test": {"dice": stat(0.8), "hd95": stat(float("nan"))}}  # older runs / binary: no per-class keys
    evals = eval_results_from_summary(binary, "toy")
    assert [(r.metric_type, r.metric_name, r.metric_value) for r in evals] == [("dice", "Dice", 0.8)]  # NaN left out
    assert "| foreground | 0.8000 ± 0.0100 (n=4) | n/a |" in results_table(binary)

    multi = {"test": {"dice": stat(0.7)}, "classes": ["TC", "WT", "ET"],
             "test_per_class": {c: {"dice": stat(v)} for c, v in (("TC", 0.6), ("WT", 0.9), ("ET", 0.6))}}
    evals = eval_results_from_summary(multi, "BraTS 2021")
    assert [(r.metric_config, r.metric_value) for r in evals] == [(None, 0.7), ("TC", 0.6), ("WT", 0.9), ("ET", 0.6)]
    table = results_table(multi)
    assert table.count("\n") == 5 and "| WT | 0.9000 ± 0.0100 (n=4) |" in table
    assert not any(math.isnan(r.metric_value) for r in evals)
