"""Model cards for published adapters, filled from ``templates/adapter_card.md`` (next to this file) through
huggingface_hub's ``ModelCard.from_template`` / ``ModelCardData`` / ``EvalResult`` (evaluation results become
model-index metadata).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..errors import PeftTensorError
from .adapter_files import read_config_file

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"  # shipped as package data
ADAPTER_TEMPLATE = TEMPLATE_DIR / "adapter_card.md"
BASE_TAGS = ["peft-tensor", "medical-imaging", "segmentation"]
TASK_TYPE = "image-segmentation"
METRIC_NAMES = {"dice": "Dice", "hd95": "HD95 (mm)"}
# adapter_config.json fields that are PEFT bookkeeping, not hyperparameters worth a table row.
_NOT_HYPERPARAMETERS = {
    "peft_type", "task_type", "auto_mapping", "base_model_name_or_path", "revision", "inference_mode",
    "peft_version", "peft_tensor_version", "megatron_config", "megatron_core",
}


class CardError(PeftTensorError):
    """The model card cannot be built or its metadata is invalid."""


def eval_results_from(evaluation: Any) -> list[EvalResult]:
    """Evaluation results as ``EvalResult`` objects.

    Accepts a list of ``EvalResult`` / dicts of its fields, or the short form
    ``{"dataset": "MSD Task04 Hippocampus", "dataset_type": "msd-hippocampus", "split": "test",
    "metrics": {"dice": 0.88, "hd95": 1.9}}``.
    """
    if evaluation is None:
        return []
    if isinstance(evaluation, Mapping) and "metrics" in evaluation:
        name = evaluation.get("dataset") or evaluation.get("dataset_name")
        if not name:
            raise CardError("evaluation needs a 'dataset' name, e.g. {'dataset': 'MSD Task04 Hippocampus', ...}.")
        return [
            EvalResult(
                task_type=TASK_TYPE, task_name="3D segmentation", dataset_name=str(name),
                dataset_type=str(evaluation.get("dataset_type") or _slug(name)),
                dataset_split=evaluation.get("split"), metric_type=str(metric).lower(),
                metric_name=METRIC_NAMES.get(str(metric).lower(), str(metric)), metric_value=float(value),
            )
            for metric, value in evaluation["metrics"].items()
        ]
    results = []
    for item in evaluation:
        if isinstance(item, EvalResult):
            results.append(item)
        elif isinstance(item, Mapping):
            item = dict(item)
            item.setdefault("task_type", TASK_TYPE)
            results.append(EvalResult(**item))
        else:
            raise CardError(f"evaluation entries must be EvalResult or dicts, got {type(item).__name__}.")
    return results


def eval_results_to_json(results: Iterable[EvalResult]) -> list[dict]:
    return [{k: v for k, v in dataclasses.asdict(r).items() if v is not None} for r in results]


def build_adapter_card(adapter_dir: str | os.PathLike, record: dict | None, *, repo_id: str | None = None,
                       template_path: str | os.PathLike | None = None) -> ModelCard:
    """The model card for the adapter(s) in ``adapter_dir``, described by its provenance ``record``."""
    from .provenance import BaseNetwork

    record = record or {}
    adapters = record.get("adapters") or {"default": {"subfolder": None}}
    first = next(iter(adapters.values()))
    config = read_config_file(Path(adapter_dir) / (first.get("subfolder") or ""))
    method = str(config["peft_type"])
    base = BaseNetwork.from_dict(record["base_network"]) if record.get("base_network") else None
    card_info = record.get("card") or {}
    evals = eval_results_from(card_info.get("eval_results"))
    framework_tag = "transformers" if base and base.cls.startswith("transformers.") else "monai"
    title = (repo_id or card_info.get("name") or Path(adapter_dir).resolve().name).split("/")[-1]

    data = ModelCardData(
        library_name="peft",
        license=card_info.get("license"),
        tags=BASE_TAGS[:1] + [method.lower()] + BASE_TAGS[1:] + [framework_tag] + list(card_info.get("tags") or []),
        pipeline_tag=TASK_TYPE,
        datasets=card_info.get("datasets"),
        base_model=(base.weights.repo_id if base and base.weights and base.weights.repo_id else None),
        model_name=title if evals else None,
        eval_results=evals or None,
        metrics=sorted({r.metric_type for r in evals}) or None,
    )
    counts = []
    for name, info in adapters.items():
        parts = []
        if info.get("trainable_params") is not None:
            total = info.get("all_params")
            share = f" ({100 * info['trainable_params'] / total:.3f}% of {total:,})" if total else ""
            parts.append(f"{info['trainable_params']:,} trainable{share}")
        if info.get("stored_values") is not None:
            parts.append(f"{info['stored_values']:,} values stored in the adapter file")
        counts.append((name, ", ".join(parts) or "not recorded"))
    hyper = [(k, v) for k, v in sorted(config.items()) if k not in _NOT_HYPERPARAMETERS
             and v not in (None, {}, [], "") and (v is not False or k.startswith("init"))]
    template = Path(template_path) if template_path else ADAPTER_TEMPLATE
    if not template.is_file():
        raise CardError(f"Model card template {template} not found (it ships as package data in "
                        "peft_tensor/hub/templates/).")
    card = ModelCard.from_template(
        data, template_path=str(template),
        title=title, method=method, repo_id=repo_id or str(adapter_dir),
        base_class=base.cls if base else None,
        base_description=base.describe() if base else None,
        base_weights=base.weights.describe() if base and base.weights else None,
        hyperparameters=hyper, parameter_counts=counts,
        training_data=card_info.get("training_data"),
        eval_rows=evals, adapters=list(adapters),
        snippet=loading_snippet(repo_id or str(adapter_dir), base),
        versions=record.get("written_by") or {},
    )
    check_card_metadata(card)
    return card


def loading_snippet(source: str, base) -> str:
    """Python that loads the adapter as written (and runs one forward pass when the input shape is known)."""
    lines = ["import torch", "from peft_tensor.hub import load_pretrained", ""]
    if base is None:
        lines[1] = "from peft_tensor.hub import build_network, load_pretrained"
        lines += ["# The publisher recorded no base network: build the network this adapter was trained on.",
                  "base = ...", f"model = load_pretrained({source!r}, base_model=base)"]
        return "\n".join(lines)
    if base.weights is None:
        lines[1] = "from peft_tensor.hub import build_network, load_pretrained"
        args = "".join(f", {k}={v!r}" for k, v in base.kwargs.items())
        lines += ["# No base weights were recorded: load your pretrained weights into `base` first.",
                  f"base = build_network({base.cls!r}{args})",
                  f"model = load_pretrained({source!r}, base_model=base)"]
    else:
        lines.append(f"model = load_pretrained({source!r})")
    shape = _input_shape(base)
    if shape is not None:
        lines += ["model.eval()", "with torch.no_grad():", f"    logits = model(torch.zeros{shape})",
                  "print(logits.shape)"]
    return "\n".join(lines)


def _input_shape(base) -> tuple | None:
    if base.config is not None:
        return None
    kwargs = base.kwargs
    channels = kwargs.get("in_channels")
    if channels is None:
        return None
    size = kwargs.get("img_size")
    dims = int(kwargs.get("spatial_dims", 3))
    if size is None:
        if not base.cls.endswith("SwinUNETR"):
            return None
        size = 64
    size = [int(size)] * dims if isinstance(size, (int, float)) else [int(s) for s in size]
    return (1, int(channels), *size)


def check_card_metadata(card: ModelCard) -> None:
    """Client-side validation of the card metadata with huggingface_hub's own parsers (the Hub re-checks on push)."""
    reparsed = ModelCard(str(card))
    meta = reparsed.data.to_dict()
    if meta.get("library_name") != "peft":
        raise CardError("model card metadata lost library_name: peft")
    if card.data.eval_results and not reparsed.data.eval_results:
        raise CardError("model card evaluation results do not round-trip through model-index metadata")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in str(text).lower()).strip("-")
