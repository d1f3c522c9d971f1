"""Model cards for published adapters and base weights: the logic that fills the templates of the top-level
``model_cards/`` folder (``adapter_card.md``, ``base_weights_card.md``; shipped as the ``peft_tensor.model_cards``
package and read with ``importlib.resources``) through huggingface_hub's ``ModelCard.from_template`` /
``ModelCardData`` / ``EvalResult`` (evaluation results become model-index metadata).

Metadata conventions (the same on adapter and base-weights cards):

- ``library_name: peft-tensor``. The Hub derives the "Use this model" code from ``library_name``. Its ``peft``
  snippet (huggingface.js ``model-libraries-snippets.ts``) builds the base with ``transformers.AutoModelFor<task>``
  from ``base_model_name_or_path`` and only for the text task types (CAUSAL_LM, SEQ_2_SEQ_LM, TOKEN_CLS, SEQ_CLS):
  for a MONAI network it shows "Task type is invalid." The Hub has no ``monai`` library entry either. An unlisted
  name gives no generated snippet, so the snippet readers see is the card's own (``peft_tensor.hub.load_pretrained``,
  which rebuilds the MONAI network from ``peft_tensor.json``); ``peft`` stays a tag so PEFT adapters remain findable.
- tags: :data:`BASE_TAGS` on both; an adapter card adds its method, its framework (``monai`` / ``transformers``)
  and the publisher's tags.
- ``base_model`` (the base-weights repository) with ``base_model_relation: adapter`` when the base weights are on the
  Hub; ``pipeline_tag: image-segmentation``; ``license`` always (``unknown`` when the publisher states none).
"""

from __future__ import annotations

import dataclasses
import math
import os
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..errors import PeftTensorError
from .adapter_files import read_config_file

TEMPLATE_PACKAGE = "peft_tensor.model_cards"  # the top-level model_cards/ folder (a package-dir mapping)
ADAPTER_TEMPLATE = "adapter_card.md"
BASE_WEIGHTS_TEMPLATE = "base_weights_card.md"
LIBRARY_NAME = "peft-tensor"
BASE_TAGS = ["peft-tensor", "peft", "medical-imaging", "segmentation"]
TASK_TYPE = "image-segmentation"
NO_LICENSE = "unknown"
METRIC_NAMES = {"dice": "Dice", "hd95": "HD95 (mm)", "jaccard": "Jaccard"}
# adapter_config.json fields that are PEFT bookkeeping, not hyperparameters worth a table row.
_NOT_HYPERPARAMETERS = {
    "peft_type", "task_type", "auto_mapping", "base_model_name_or_path", "revision", "inference_mode",
    "peft_version", "peft_tensor_version", "megatron_config", "megatron_core",
}


class CardError(PeftTensorError):
    """The model card cannot be built or its metadata is invalid."""


def template_text(name: str) -> str:
    """The text of the card template ``name`` of ``model_cards/``, read as package data with ``importlib.resources``.

    A source checkout whose editable install predates the ``peft_tensor.model_cards`` mapping cannot import that
    package: there the checkout's own ``model_cards/`` folder (beside ``peft_tensor/``) is read instead."""
    try:
        root = resources.files(TEMPLATE_PACKAGE)
    except ModuleNotFoundError:
        root = Path(__file__).resolve().parents[2] / "model_cards"
    try:
        return (root / name).read_text(encoding="utf-8")
    except OSError as exc:
        raise CardError(f"Model card template {name} not found in {TEMPLATE_PACKAGE} (the top-level model_cards/ "
                        "folder, shipped as package data); reinstall peft-tensor.") from exc


def read_card(path: str | os.PathLike) -> ModelCard:
    """Parse a model card (``README.md``) written by anyone: UTF-8 text, YAML front matter read with a safe loader
    only (no ``!!python/...`` tags), metadata errors tolerated. Raises :class:`CardError` for anything else."""
    import yaml
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    from .._safe_yaml import YamlLimitError, load_yaml

    path = Path(path)
    problem = f"{path} is not a valid model card"
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CardError(f"{problem}: it is not UTF-8 text ({exc.reason} at byte {exc.start}).") from exc
    match = REGEX_YAML_BLOCK.search(text)
    if match:
        try:
            meta = load_yaml(match.group(2))  # bounded: a card's aliases cannot expand to gigabytes
        except (yaml.YAMLError, YamlLimitError, RecursionError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CardError(f"{problem}: its YAML metadata cannot be read safely ({first}).") from exc
        if meta is not None and not isinstance(meta, dict):
            raise CardError(f"{problem}: its YAML metadata is a {type(meta).__name__}, not a mapping.")
    try:  # parses the front matter again, with yaml.safe_load as well
        return ModelCard(text, ignore_metadata_errors=True)
    except Exception as exc:  # huggingface_hub's checks of the metadata values (ValueError, TypeError, ...)
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CardError(f"{problem}: {type(exc).__name__}: {first}") from exc


def eval_results_from(evaluation: Any) -> list[EvalResult]:
    """Evaluation results as ``EvalResult`` objects.

    Accepts a list of ``EvalResult`` / dicts of its fields, or the short form
    ``{"dataset": "MSD Task04 Hippocampus", "dataset_type": "msd-hippocampus", "split": "test",
    "metrics": {"dice": 0.88, "hd95": 1.9}}``, or a recipe's results (see :func:`eval_results_from_summary`):
    ``{"dataset": ..., "results": {"test": {...}, "classes": [...], "test_per_class": {...}}}``.
    """
    if evaluation is None:
        return []
    if isinstance(evaluation, Mapping) and "results" in evaluation:
        return eval_results_from_summary(evaluation["results"], evaluation.get("dataset"),
                                         evaluation.get("dataset_type"), evaluation.get("split") or "test")
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


def eval_results_from_summary(results: Mapping, dataset: str | None, dataset_type: str | None = None,
                              split: str = "test") -> list[EvalResult]:
    """Model-index entries from a recipe's results: every metric of :data:`METRIC_NAMES` as the mean over classes and
    per class (``metric_config`` = class name).

    ``results[split]`` = ``{metric: {"mean", "std", "n"}}`` (the mean over classes), ``results["classes"]`` = class
    names, ``results[f"{split}_per_class"]`` = ``{class: {metric: {"mean", "std", "n"}}}``; the per-class keys may be
    absent (binary tasks, older runs). Non-finite values (an HD95 with an empty prediction) are left out: model-index
    values must be numbers.
    """
    summary = results.get(split) or {}
    if not summary:
        return []
    if not dataset:
        raise CardError("results need a dataset name for the model card, e.g. dataset='MSD Task04 Hippocampus'.")
    per_class = results.get(f"{split}_per_class") or {}
    classes = [str(c) for c in (results.get("classes") or per_class)]
    several = len(classes) > 1 or (per_class and len(per_class) > 1)
    common = dict(task_type=TASK_TYPE, task_name="3D segmentation", dataset_name=str(dataset),
                  dataset_type=str(dataset_type or _slug(dataset)), dataset_split=split)
    out = []
    for metric, label in METRIC_NAMES.items():
        value = _finite((summary.get(metric) or {}).get("mean"))
        if value is not None:
            name = f"{label}, mean over classes" if several else label
            out.append(EvalResult(metric_type=metric, metric_name=name, metric_value=value, **common))
        for cls in classes if several else ():
            value = _finite(((per_class.get(cls) or {}).get(metric) or {}).get("mean"))
            if value is not None:
                out.append(EvalResult(metric_type=metric, metric_name=f"{label} ({cls})", metric_config=cls,
                                      metric_value=value, **common))
    return out


def results_table(results: Mapping | None, split: str = "test") -> str | None:
    """Markdown table: the mean over classes and every class (rows) x each metric, as mean ± std (n)."""
    summary = (results or {}).get(split) or {}
    if not summary:
        return None
    per_class = results.get(f"{split}_per_class") or {}
    classes = [str(c) for c in (results.get("classes") or per_class)]
    metrics = [m for m in METRIC_NAMES if m in summary] + sorted(
        m for m in summary if m not in METRIC_NAMES and isinstance(summary[m], Mapping))
    rows = [("mean over classes" if len(classes) > 1 else (classes[0] if classes else "foreground"), summary)]
    if len(classes) > 1:
        rows += [(cls, per_class.get(cls) or {}) for cls in classes]
    lines = ["| class | " + " | ".join(METRIC_NAMES.get(m, m) for m in metrics) + " |",
             "|---|" + "---:|" * len(metrics)]
    for name, values in rows:
        lines.append(f"| {name} | " + " | ".join(_cell(values.get(m)) for m in metrics) + " |")
    return "\n".join(lines)


def _cell(stat) -> str:
    if not isinstance(stat, Mapping) or _finite(stat.get("mean")) is None:
        return "n/a"
    std = _finite(stat.get("std"))
    return f"{stat['mean']:.4f}" + (f" ± {std:.4f}" if std is not None else "") + (
        f" (n={stat['n']})" if stat.get("n") is not None else "")


def _finite(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


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

    base_repo = base.weights.repo_id if base and base.weights and base.weights.repo_id else None
    tags = BASE_TAGS[:1] + [method.lower()] + BASE_TAGS[1:] + [framework_tag]
    tags += [t for t in card_info.get("tags") or [] if t not in tags]
    extra = {"base_model_relation": "adapter"} if base_repo else {}
    data = ModelCardData(
        library_name=LIBRARY_NAME,
        license=card_info.get("license") or NO_LICENSE,
        tags=tags,
        pipeline_tag=TASK_TYPE,
        datasets=card_info.get("datasets"),
        base_model=base_repo,
        model_name=title if evals else None,
        eval_results=evals or None,
        metrics=sorted({r.metric_type for r in evals}) or None,
        **extra,
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
    if template_path is None:
        template = template_text(ADAPTER_TEMPLATE)
    elif Path(template_path).is_file():
        template = Path(template_path).read_text(encoding="utf-8")
    else:
        raise CardError(f"Model card template {template_path} not found.")
    card = ModelCard.from_template(
        data, template_str=template,
        title=title, method=method, repo_id=repo_id or str(adapter_dir),
        base_class=base.cls if base else None,
        base_description=base.describe() if base else None,
        base_weights=base.weights.describe() if base and base.weights else None,
        hyperparameters=hyper, parameter_counts=counts,
        training_data=card_info.get("training_data"),
        details=card_info.get("details"),
        results_table=results_table(card_info.get("results")),
        license=card_info.get("license"),
        eval_rows=evals, adapters=list(adapters),
        snippet=loading_snippet(repo_id or str(adapter_dir), base),
        versions=record.get("written_by") or {},
    )
    check_card_metadata(card)
    return card


def build_base_weights_card(description: str, filename: str, sha256: str, *, license: str | None = None) -> ModelCard:
    """The model card of a base-weights repository: the adapter cards' ``library_name``, ``pipeline_tag`` and
    :data:`BASE_TAGS`; ``license`` defaults to ``unknown``."""
    data = ModelCardData(library_name=LIBRARY_NAME, license=license or NO_LICENSE, pipeline_tag=TASK_TYPE,
                         tags=list(BASE_TAGS))
    card = ModelCard.from_template(data, template_str=template_text(BASE_WEIGHTS_TEMPLATE),
                                   description=description, filename=filename, sha256=sha256)
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
    if meta.get("library_name") != LIBRARY_NAME:
        raise CardError(f"model card metadata lost library_name: {LIBRARY_NAME}")
    if meta.get("base_model") and meta.get("base_model_relation") != "adapter":
        raise CardError("model card metadata names a base_model without base_model_relation: adapter")
    if card.data.eval_results and not reparsed.data.eval_results:
        raise CardError("model card evaluation results do not round-trip through model-index metadata")


def _slug(text: str) -> str:
    import re

    return re.sub(r"-+", "-", "".join(c if c.isalnum() else "-" for c in str(text).lower())).strip("-")
