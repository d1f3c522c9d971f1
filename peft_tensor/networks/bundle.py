"""The adapted network out again, as a MONAI bundle: :func:`export_bundle`.

``export_bundle(model, "out/my_bundle")`` merges the adapter(s) of a ``PeftModel`` into a copy of its base network
(``merge_and_unload``; the user's model is not modified) and writes::

    my_bundle/
      configs/inference.json   network_def (``_target_`` + constructor arguments) [+ a SlidingWindowInferer]
      configs/metadata.json    MONAI bundle metadata + what was merged (peft_type, adapter, base network)
      models/model.pt          the merged network's state dict (torch.save; loads with weights_only=True)
      models/model.ts          TorchScript (torch.jit.script, else torch.jit.trace at the example input shape)
      docs/README.md

into a temporary folder beside the target, renamed into place when complete. ``monai.bundle.ConfigParser`` builds
``network_def`` and ``load_state_dict(torch.load("models/model.pt", weights_only=True))`` restores the weights;
:func:`~peft_tensor.networks.load_network` reads the folder back.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..errors import PeftTensorError
from ..version import __version__
from .specs import build_from_spec, split_spec, spec_of

__all__ = ["BundleExportError", "export_bundle", "merged_copy"]

METADATA_SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json"


class BundleExportError(PeftTensorError):
    """The network cannot be exported as a MONAI bundle."""


def merged_copy(model: nn.Module) -> tuple[nn.Module, dict]:
    """A plain network equal to ``model`` with its adapters merged (a copy; ``model`` is unchanged), and what was
    merged (``{"adapters": {name: peft_type}, ...}``)."""
    from .._peft_compat import BaseTunerLayer

    info: dict[str, Any] = {}
    if hasattr(model, "merge_and_unload") and hasattr(model, "peft_config"):
        info["adapters"] = {name: str(getattr(cfg.peft_type, "value", cfg.peft_type))
                            for name, cfg in model.peft_config.items()}
        info["active_adapter"] = model.active_adapter
        work = copy.deepcopy(model)
        try:
            merged = work.merge_and_unload()
        except Exception as exc:  # noqa: BLE001 - a method that cannot merge says why; keep its message
            raise BundleExportError(f"merging the adapter failed: {type(exc).__name__}: {exc}") from exc
    else:
        merged = copy.deepcopy(model)
    if any(isinstance(m, BaseTunerLayer) for m in merged.modules()):
        raise BundleExportError("the network still holds adapter layers after merging (an adapter injected with "
                                "inject_adapter_in_model?); wrap it with get_peft_model / PeftModel to export it.")
    return merged.eval(), info


def export_bundle(model: nn.Module, out_dir: str | os.PathLike, *, network_def: Mapping | None = None,
                  roi_size: Sequence[int] | None = None, example_input: torch.Tensor | None = None,
                  torchscript: bool = True, overwrite: bool = False, description: str | None = None,
                  channel_names: Sequence[str] | None = None, atol: float = 1e-4) -> Path:
    """Write ``model`` (a ``PeftModel``, merged into a copy, or a plain network) as a MONAI bundle folder.

    Args:
        model: the adapted network. Its base network must carry its constructor arguments (built with
            :func:`~peft_tensor.networks.load_network`, ``peft_tensor.hub.build_network`` / ``record_network`` or the
            recipes), or pass ``network_def``.
        out_dir: the bundle folder to create.
        network_def: ``{"_target_": class path, **kwargs}`` when the network carries no record.
        roi_size: the inference window (``SlidingWindowInferer`` in ``inference.json``); default: the network's
            ``img_size`` when it has one.
        example_input: the input TorchScript is checked on (and traced at, when scripting fails); default: zeros of
            ``(1, in_channels, *roi_size)`` (SwinUNETR without ``roi_size``: 64 per side).
        torchscript: also write ``models/model.ts``.
        overwrite: replace an existing bundle folder at ``out_dir``.
        description / channel_names: for ``metadata.json`` (output channel names, e.g. ``["background", "tumour"]``).
        atol: tolerance of the TorchScript check against the merged network.

    Returns:
        the bundle folder.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise BundleExportError(f"{out} exists; pass overwrite=True (CLI: --overwrite) to replace it.")
    if out.exists() and any(out.iterdir()) and not (out / "configs").is_dir():
        raise BundleExportError(f"{out} exists and is not a bundle folder; refusing to replace it. Choose a new "
                                "folder.")
    merged, info = merged_copy(model)
    merged = merged.cpu().float()
    netdef = dict(network_def) if network_def is not None else spec_of(model)
    if netdef is None:
        raise BundleExportError(
            f"{type(merged).__name__} carries no constructor arguments, so network_def cannot be written. Build it "
            "with peft_tensor.load_network / peft_tensor.hub.build_network, declare them with "
            "peft_tensor.hub.record_network(net, **kwargs), or pass network_def={'_target_': ..., ...}.")
    class_path, kwargs = split_spec(netdef)
    state = {k: v.detach().cpu().contiguous() for k, v in merged.state_dict().items()}
    # the bundle must rebuild exactly this network: build network_def and load the merged weights strictly
    network = build_from_spec(class_path, kwargs)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BundleExportError(f"network_def {class_path}({kwargs}) does not rebuild the adapted network: "
                                f"{str(exc).splitlines()[0]} ... Pass the constructor arguments it was built "
                                "with.") from None
    network.eval()
    roi = list(roi_size) if roi_size is not None else _img_size(kwargs)
    if example_input is None:
        dims = int(kwargs.get("spatial_dims", 3))
        shape = roi or ([64] * dims if class_path.endswith("SwinUNETR") else None)  # SwinUNETR: sides >= 64
        if shape is not None:
            example_input = torch.zeros(1, int(kwargs.get("in_channels", 1)), *shape)
    ts_info: dict[str, Any] = {}
    ts_module = _torchscript(network, example_input, atol, ts_info) if torchscript else None

    inference: dict[str, Any] = {"bundle_root": ".", "network_def": {"_target_": class_path, **kwargs}}
    if roi:
        inference["inferer"] = {"_target_": "SlidingWindowInferer", "roi_size": roi, "sw_batch_size": 1,
                                "overlap": 0.5}
    metadata = _metadata(class_path, kwargs, roi, info, ts_info, description, channel_names)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        (tmp / "configs").mkdir()
        (tmp / "models").mkdir()
        (tmp / "docs").mkdir()
        (tmp / "configs" / "inference.json").write_text(json.dumps(inference, indent=2) + "\n", encoding="utf-8")
        (tmp / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        torch.save(state, tmp / "models" / "model.pt")
        if ts_module is not None:
            import warnings

            with warnings.catch_warnings():  # torch 2.13 deprecates torch.jit in favour of torch.export; MONAI bundles
                warnings.simplefilter("ignore", DeprecationWarning)  # still ship TorchScript as models/model.ts
                torch.jit.save(ts_module, str(tmp / "models" / "model.ts"))
        (tmp / "docs" / "README.md").write_text(_readme(class_path, info, ts_info, roi), encoding="utf-8")
        for path in tmp.rglob("*"):
            if path.is_file():
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _img_size(kwargs: Mapping) -> list[int] | None:
    size = kwargs.get("img_size")
    if size is None:
        return None
    dims = int(kwargs.get("spatial_dims", 3))
    return [int(size)] * dims if isinstance(size, int) else [int(s) for s in size]


def _torchscript(network: nn.Module, example: torch.Tensor | None, atol: float, info: dict):
    import warnings

    errors = []
    module = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit deprecation and tracer warnings: the check below decides
        try:
            module = torch.jit.script(copy.deepcopy(network))
            info.update(method="torch.jit.script")
        except Exception as exc:  # noqa: BLE001 - scripting fails on many networks; tracing is the fallback
            errors.append(f"script: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            if example is not None:
                try:
                    with torch.no_grad():
                        module = torch.jit.trace(copy.deepcopy(network), example, check_trace=False)
                    info.update(method="torch.jit.trace", input_shape=list(example.shape),
                                note="traced: shapes are fixed at the traced input size")
                except Exception as exc2:  # noqa: BLE001
                    errors.append(f"trace: {type(exc2).__name__}: {str(exc2).splitlines()[0]}")
    if module is None:
        raise BundleExportError(
            f"TorchScript export failed ({'; '.join(errors)}"
            f"{'; no example input to trace with: pass roi_size or example_input' if example is None else ''}). "
            "Pass torchscript=False (CLI: --no-torchscript) to write the bundle without models/model.ts.")
    if example is not None:
        with torch.no_grad():
            want, got = network(example), module(example)
        err = (want - got).abs().max().item()
        if err > atol:
            raise BundleExportError(f"the TorchScript module differs from the network by {err:.2e} (> atol {atol}) "
                                    f"on input {tuple(example.shape)}; pass torchscript=False.")
        info.update(checked_on=list(example.shape), max_abs_error=err)
    return module


def _metadata(class_path, kwargs, roi, info, ts_info, description, channel_names) -> dict:
    import monai
    import numpy

    out_ch = int(kwargs.get("out_channels", 0) or 0)
    names = list(channel_names) if channel_names else (
        ["background"] + [f"class {i}" for i in range(1, out_ch)] if out_ch else [])
    shape = roi or []
    adapters = info.get("adapters") or {}
    what = (f"{class_path.rsplit('.', 1)[-1]} with merged {', '.join(sorted(set(adapters.values())))} adapter"
            if adapters else class_path.rsplit(".", 1)[-1])
    return {
        "schema": METADATA_SCHEMA,
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by peft_tensor {__version__}: {what}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {},
        "task": "segmentation",
        "description": description or what,
        "authors": "",
        "copyright": "",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "magnitude", "num_channels": int(kwargs.get(
                "in_channels", 1)), "spatial_shape": shape, "dtype": "float32", "value_range": [],
                "is_patch_data": bool(shape), "channel_def": {"0": "image"}}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": out_ch,
                                 "spatial_shape": shape, "dtype": "float32", "value_range": [],
                                 "is_patch_data": bool(shape),
                                 "channel_def": {str(i): n for i, n in enumerate(names)}}},
        },
        "peft_tensor": {"version": __version__, "network": class_path, "merged_adapters": adapters,
                        "active_adapter": info.get("active_adapter"), "torchscript": ts_info},
    }


def _readme(class_path, info, ts_info, roi) -> str:
    adapters = info.get("adapters") or {}
    merged = ", ".join(f"{n} ({t})" for n, t in adapters.items()) or "none (a plain network)"
    ts = (f"`models/model.ts`: {ts_info.get('method')}" + (f", {ts_info['note']}" if ts_info.get("note") else "")
          if ts_info else "no TorchScript export")
    return (f"# {class_path.rsplit('.', 1)[-1]} (merged adapter)\n\nExported by peft_tensor {__version__}.\n\n"
            f"- network: `{class_path}`, arguments in `configs/inference.json` (`network_def`)\n"
            f"- merged adapters: {merged}\n- weights: `models/model.pt` (state dict)\n- {ts}\n"
            + (f"- inference window: {roi}\n" if roi else "")
            + "\n```python\nimport torch\nfrom monai.bundle import ConfigParser\n\nparser = ConfigParser()\n"
            "parser.read_config(\"configs/inference.json\")\nnet = parser.get_parsed_content(\"network_def\")\n"
            "net.load_state_dict(torch.load(\"models/model.pt\", weights_only=True))\n```\n")


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` folder to ``out``; an existing ``out`` is moved aside first and removed after."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.rmdir(old)
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    os.chmod(out, 0o777 & ~_umask())
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    from .._atomic import _current_umask

    return _current_umask()
