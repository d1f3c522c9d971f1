"""The run-output writer (``peft_tensor.training.outputs.save_outputs``): every adapter a recipe writes carries its
provenance and our card (issue 11, section 6).

The finetune recipe end to end -- a bundle in, the adapter folder checked, pushed to the local Hub server and
rebuilt by repo id in a fresh process -- is tested with the docs/recipes.md section that runs it
(``tests/test_readme.py::test_recipe_adapter_is_ready_to_share`` and
``::test_pushed_adapter_rebuilds_by_repo_id_in_fresh_process``); here the writer's choices on tiny untrained models.
"""

from __future__ import annotations

import json
import math

import torch
from huggingface_hub import ModelCard

from peft_tensor.hub import load_pretrained
from peft_tensor.hub.cards import LIBRARY_NAME, eval_results_from_summary, results_table
from peft_tensor.training import apply_arm
from peft_tensor.training.models import build_model, save_backbone
from peft_tensor.training.outputs import save_outputs

from tests._recipe_fixtures import TINY_MODEL

RESULT = {"test": {"dice": {"mean": 0.5, "std": 0.1, "n": 2}}}


def _x():
    return torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(3))


def test_base_weights_referenced_when_exact_else_written(tmp_path):
    """A pretrained model.safetensors holding exactly the base is referenced where it is; without one, the run's
    base weights are written once beside the adapter, and the adapter loads from the folder alone."""
    torch.manual_seed(0)
    save_backbone(build_model(TINY_MODEL), TINY_MODEL, tmp_path / "backbone")
    from peft_tensor.training import load_backbone

    for name, pretrained in (("referenced", str(tmp_path / "backbone")), ("written", None)):
        torch.manual_seed(1)
        base = load_backbone(pretrained, TINY_MODEL)[0] if pretrained else build_model(TINY_MODEL)
        model = apply_arm(base, {"name": "lora", "r": 2, "init_lora_weights": False}, TINY_MODEL).eval()
        cfg = {**TINY_MODEL, "pretrained": pretrained}
        save_outputs(model, tmp_path / name / "adapter", arm="lora", model_cfg=cfg, result=RESULT,
                     data_cfg={"kind": "pairs", "root": "/data/hippo"}, data_description="two toy cases")
        weights = json.loads((tmp_path / name / "adapter" / "peft_tensor.json").read_text())["base_network"]["weights"]
        if pretrained:
            assert weights["path"] == str((tmp_path / "backbone" / "model.safetensors").resolve())
            assert not (tmp_path / name / "base").exists()
        else:
            assert weights["path"] == "../base/model.safetensors"  # inside the run folder: relative, movable
        with torch.no_grad():
            assert torch.equal(load_pretrained(tmp_path / name / "adapter")(_x()), model(_x()))
        card = ModelCard((tmp_path / name / "adapter" / "README.md").read_text())
        assert card.data.library_name == LIBRARY_NAME and card.data.license == "apache-2.0"
        assert card.data.eval_results[0].dataset_name == "pairs dataset hippo"
        assert card.text.lstrip().startswith(f"# {name}\n")  # titled by the run folder until pushed


def test_unrecordable_base_still_saves_the_adapter(tmp_path):
    """A trained adapter is never lost over its record: a network the model config does not describe is saved with
    a warning, and the card says the base network is not recorded."""
    import pytest
    from peft import LoraConfig, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.proj(x)

    model = get_peft_model(Net(), LoraConfig(r=2, target_modules=["proj"]))
    with pytest.warns(UserWarning, match="without its base network record"):
        save_outputs(model, tmp_path / "adapter", arm="lora", model_cfg=TINY_MODEL, result=RESULT)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "Network: not recorded" in card and "| foreground | 0.5000" in card


def test_non_peft_arm_gets_weights_record_and_card(tmp_path):
    model = apply_arm(build_model(TINY_MODEL), "frozen", TINY_MODEL)
    save_outputs(model, tmp_path / "adapter", arm="frozen", model_cfg=TINY_MODEL, result=RESULT,
                 card_cfg={"license": "mit", "dataset": "toy"})
    folder = tmp_path / "adapter"
    assert (folder / "trainable.safetensors").is_file()
    record = json.loads((folder / "peft_tensor.json").read_text())
    assert record["base_network"]["class"] == "monai.networks.nets.UNETR"
    card = ModelCard((folder / "README.md").read_text())
    assert card.data.license == "mit" and card.data.library_name == LIBRARY_NAME
    assert "load_trained" in card.text and "| foreground | 0.5000 ± 0.1000 (n=2) |" in card.text


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


def test_base_model_name_or_path_is_the_hub_repo_or_bundle_name(tmp_path):
    from peft_tensor.hub.provenance import BaseNetwork, WeightsRef
    from peft_tensor.hub.publish import base_reference

    net = lambda **kw: BaseNetwork("monai.networks.nets.UNETR", {}, **kw)  # noqa: E731
    assert base_reference(net(source="spleen_ct_segmentation")) == "spleen_ct_segmentation"  # a bundle name
    assert base_reference(net(source="lab/unetr-base")) == "lab/unetr-base"  # a Hub repo id
    assert base_reference(net(source=str(tmp_path))) is None  # a local folder says nothing to others
    assert base_reference(net(source="weights/model.pth")) is None
    hub_weights = WeightsRef(sha256="0" * 64, repo_id="lab/pushed-base", filename="model.safetensors")
    assert base_reference(net(source="spleen_ct_segmentation", weights=hub_weights)) == "lab/pushed-base"
