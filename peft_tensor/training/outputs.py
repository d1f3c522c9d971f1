"""What a recipe run leaves behind for its trained weights: ready to share as it stands.

:func:`save_outputs` writes ``<run>/adapter/``:

- PEFT arms: the adapter (``adapter_model.safetensors`` + ``adapter_config.json``), ``peft_tensor.json`` (the base
  network's class path + constructor arguments, the base weights' reference with sha256, the pretrained source) and
  our model card (method, data, per-class results, how to load) -- through :func:`peft_tensor.hub.save_pretrained`,
  so ``peft-tensor info`` / ``peft-tensor push`` / ``peft_tensor.hub.load_pretrained`` work on the folder directly.
- other arms (``full``, ``decoder_only``, ``frozen``): the trained weights as ``trainable.safetensors`` and a card
  with the same run summary and results.

The base weights are referenced where they already are -- the pretrained ``model.safetensors`` (a backbone folder,
a bundle's ``models/model.safetensors``, a ``.safetensors`` checkpoint) when its tensors are exactly the run's base
weights. Otherwise (a pickle-format checkpoint such as a bundle's ``model.pt``, a checkpoint loaded with a
re-initialised head, a network without pretrained weights) the run's actual base weights are written once to
``<run>/base/model.safetensors`` and referenced from there, so the adapter never points at weights it was not
trained on. Publish both with ``peft-tensor push <run>/adapter user/repo --base-weights-repo user/base``.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Mapping

import torch

from .._atomic import atomic_write, atomic_write_text

logger = logging.getLogger(__name__)

DEFAULT_LICENSE = "apache-2.0"  # the recipes' default for the cards they write; `card.license=` in the config
_CLASS_PATHS = {"unetr": "monai.networks.nets.UNETR", "swinunetr": "monai.networks.nets.SwinUNETR"}
_DATASET_NAMES = {"embedded": "peft-tensor template-derived hippocampus cohort (synthetic)",
                  "msd": "MSD Task04 Hippocampus", "brats": "BraTS 2021"}
_WEIGHT_NAMES = ("model.safetensors", "models/model.safetensors")


def dataset_name(data_cfg: Mapping | None) -> str:
    """A short dataset name for the card's model-index: ``data.name`` if set, else one per loader kind."""
    data_cfg = dict(data_cfg or {})
    if data_cfg.get("name"):
        return str(data_cfg["name"])
    kind = str(data_cfg.get("kind", "embedded"))
    if kind in _DATASET_NAMES:
        return _DATASET_NAMES[kind]
    root = data_cfg.get("root")
    return f"{kind} dataset {Path(str(root)).name}" if root else f"{kind} dataset"


def save_outputs(model: torch.nn.Module, folder: str | os.PathLike, *, arm: str, model_cfg: Mapping,
                 result: Mapping | None = None, data_cfg: Mapping | None = None, data_description: str | None = None,
                 details: str | None = None, card_cfg: Mapping | None = None) -> Path:
    """Write the trained weights of ``model`` (arm ``arm``) to ``folder`` with provenance and our model card.

    Args:
        model: the trained model (a ``PeftModel`` for PEFT arms).
        model_cfg: the recipe's ``model`` section (``name`` or class path, constructor arguments, ``pretrained``).
        result: the run's results (``test``, optional ``classes`` / ``test_per_class``) for the card.
        data_cfg / data_description: the ``data`` section (names the dataset) and its description (training data).
        details: Markdown run summary added to the card (the recipe's ``_card``).
        card_cfg: the config's optional ``card`` section: ``license`` (default apache-2.0), ``dataset`` (name in the
            model-index), ``tags``.
    """
    from .arms import PEFT_ARMS, canonical_arm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    card_cfg = dict(card_cfg or {})
    license = str(card_cfg.get("license") or DEFAULT_LICENSE)
    dataset = str(card_cfg.get("dataset") or dataset_name(data_cfg))
    tags = list(card_cfg.get("tags") or [])
    results = dict(result or {})
    if canonical_arm(arm) in PEFT_ARMS and hasattr(model, "peft_config"):
        from ..hub import save_pretrained
        from ..hub.provenance import ProvenanceError

        card = dict(training_data=data_description, results=results, dataset=dataset, details=details,
                    license=license, tags=tags, name=folder.resolve().parent.name)
        try:
            spec, weights = base_record(model, model_cfg, folder.parent / "base")
        except ProvenanceError as exc:  # never lose a trained adapter over its record: save it, say what is missing
            warnings.warn(f"{exc} The adapter is saved to {folder} without its base network record; record the "
                          "network (peft_tensor.hub.record_network) and save it again with "
                          "peft_tensor.hub.save_pretrained before sharing it.", stacklevel=2)
            return _save_unrecorded(model, folder, card)
        return save_pretrained(model, folder, base_network=spec, base_weights=weights, run_dir=folder.parent,
                               **card)  # <run>/base/model.safetensors: recorded relative to the adapter folder
    return _save_plain(model, folder, arm, model_cfg, results, dataset, data_description, details, license, tags)


# ---------------------------------------------------------------------------------------------------- base network
def base_record(model: torch.nn.Module, model_cfg: Mapping, base_dir: str | os.PathLike):
    """(``BaseNetwork`` record, ``WeightsRef``) of the run's frozen base network; see the module docstring."""
    from ..hub.provenance import ProvenanceError, WeightsRef

    spec = network_spec(model, model_cfg)
    skeleton = spec.build(trusted_module_roots=None, device="meta").state_dict()
    state = plain_base_state(model, skeleton)
    bad = [k for k, v in skeleton.items() if tuple(v.shape) != tuple(state[k].shape)]
    if bad:
        raise ProvenanceError(f"{spec.describe()} does not build the run's network (shape differs at {bad[:3]}); "
                              "the recipe's model section and the trained model disagree.")
    for candidate in _pretrained_safetensors(model_cfg.get("pretrained")):
        if _same_tensors(candidate, state):
            return spec, WeightsRef.from_file(candidate)
    from safetensors.torch import save_file

    path = Path(base_dir) / "model.safetensors"
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    return spec, WeightsRef.from_file(path)


def network_spec(model: torch.nn.Module, model_cfg: Mapping):
    """The base network as class path + constructor arguments: the record the network carries (built through
    ``peft_tensor.hub.build_network`` / ``record_network``), else the recipe's ``model`` section."""
    from ..hub.provenance import BaseNetwork, ProvenanceError, _to_json, describe_network

    source = model_cfg.get("pretrained")
    source = str(source) if source else None
    try:
        spec = describe_network(model)
    except ProvenanceError:
        spec = None
    if spec is None:
        from .models import model_kwargs

        name, kwargs = model_kwargs(dict(model_cfg))
        class_path = _CLASS_PATHS.get(name, name)
        if "." not in class_path:
            raise ProvenanceError(f"Cannot record the base network {name!r}: give model.name as a class path such as "
                                  "'monai.networks.nets.UNETR'.")
        spec = BaseNetwork(class_path, _to_json(kwargs, class_path))
    spec.source = source
    return spec


def plain_base_state(model: torch.nn.Module, keys) -> dict[str, torch.Tensor]:
    """The frozen base network's tensors under their plain names (``...base_layer.weight`` -> ``...weight``, a
    ``modules_to_save`` wrapper's ``original_module``), read off the (PEFT-wrapped) ``model`` without copying it."""
    from ..hub.provenance import ProvenanceError

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    state = base.state_dict()
    out, missing = {}, []
    for key in keys:
        parts = key.split(".")
        candidates = [key] + [".".join(parts[:i] + [wrapper] + parts[i:]) for i in range(len(parts) - 1, -1, -1)
                              for wrapper in ("base_layer", "original_module")]
        found = next((c for c in candidates if c in state), None)
        if found is None:
            missing.append(key)
        else:
            out[key] = state[found]
    if missing:
        raise ProvenanceError(f"The trained model has no base tensor for {missing[:3]} (of {len(missing)}): the "
                              "recorded network does not match it.")
    return out


def _pretrained_safetensors(pretrained) -> list[Path]:
    if not pretrained:
        return []
    path = Path(str(pretrained)).expanduser()
    if path.is_file():
        return [path] if path.suffix == ".safetensors" else []
    return [path / name for name in _WEIGHT_NAMES if (path / name).is_file()]


def _same_tensors(path: Path, state: Mapping[str, torch.Tensor]) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        if set(fh.keys()) != set(state):
            return False
        return all(torch.equal(fh.get_tensor(k), state[k].detach().to("cpu")) for k in state)


def _save_unrecorded(model, folder: Path, card: dict) -> Path:
    """PEFT's files and our card (base network: not recorded) when the base network cannot be described."""
    from ..hub.cards import build_adapter_card
    from ..hub.provenance import library_versions
    from ..hub.publish import card_record, save_peft_files

    save_peft_files(model, Path(folder), safe_serialization=True)  # never through a symlink planted in the folder
    record = {"written_by": library_versions(), "card": card_record(**card)}
    atomic_write_text(folder / "README.md", str(build_adapter_card(folder, record)))
    return folder


# ---------------------------------------------------------------------------------------------------- other arms
def _save_plain(model, folder: Path, arm, model_cfg, results, dataset, data_description, details, license, tags):
    from huggingface_hub import ModelCard, ModelCardData
    from safetensors.torch import save_file

    from ..hub.cards import LIBRARY_NAME, TASK_TYPE, eval_results_from_summary, results_table

    state = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    atomic_write(folder / "trainable.safetensors", lambda tmp: save_file(state, tmp))
    try:
        spec = network_spec(model, model_cfg)
        base = spec.describe() + (f", pretrained from `{spec.source}`" if spec.source else "")
        record = {"format": "peft_tensor.provenance", "format_version": 1, "base_network": spec.to_dict(),
                  "trainable": {"file": "trainable.safetensors", "arm": arm, "tensors": len(state)}}
        atomic_write_text(folder / "peft_tensor.json", json.dumps(record, indent=2) + "\n")
    except Exception as exc:  # noqa: BLE001 - the weights are saved; the card says what is missing
        logger.warning("Could not record the base network of arm %s: %s", arm, exc)
        base = "not recorded"
    evals = eval_results_from_summary(results, dataset) if results.get("test") else []
    data = ModelCardData(library_name=LIBRARY_NAME, license=license, pipeline_tag=TASK_TYPE,
                         tags=["peft-tensor", arm, "medical-imaging", "segmentation", "monai", *tags],
                         model_name=folder.resolve().parent.name if evals else None, eval_results=evals or None)
    table = results_table(results) or "No evaluation results."
    text = (f"---\n{data.to_yaml()}\n---\n\n# {folder.resolve().parent.name} ({arm})\n\n"
            f"Trained weights of the `{arm}` arm (not a PEFT adapter): `trainable.safetensors` holds the parameters "
            f"that trained, to be loaded into the base network `{base}` with "
            "`peft_tensor.training.arms.load_trained(base, folder, arm)`.\n\n"
            f"## Training data\n\n{data_description or 'Not stated.'}\n\n{details or ''}\n\n## Evaluation\n\n"
            f"{table}\n\n## Intended use and limitations\n\n- **Research use only**; not validated for clinical "
            "use.\n")
    atomic_write_text(folder / "README.md", str(ModelCard(text)))
    return folder
