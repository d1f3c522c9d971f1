"""Adapters on full-size MONAI networks: targets, trainable parameters and saved adapter file size per method.

``--targets preset`` (default): ``target_modules=None``, the network's default preset
(:func:`peft_tensor.preset_for`), with the default ``rank_cap=None`` (which caps a preset's thin layers).
``--targets whole``: every ``nn.Linear`` and every ``groups=1`` convolution with a kernel larger than 1 (transposed
ones included, the 1-channel input convolution and a ViT's patch embedding included), named one by one.
``rank_cap=True``: a group (tCURLoRA, LoRA-PT) or layer (HyPS) whose bound is below ``r`` gets that bound; the
table counts them. No ``modules_to_save``: the numbers are the adapter's own. The file size is that of
``adapter_model.safetensors`` written by ``save_pretrained``.

Networks: UNETR-B (in 1, out 2, img 96, feature 16, hidden 768, mlp 3072, 12 heads), SegResNet (in 1, out 2,
init_filters 16, blocks_down 1,2,2,4, blocks_up 1,1,1: MONAI's BraTS tutorial size), SwinUNETR-48 (in 1, out 2,
feature 48; and ``use_v2=True``), ViT-B and ViTAutoEnc (img 96, patch 16), UNet (channels 16-256, strides 2, two
residual units), DynUNet (five levels of 3x3x3 kernels), BasicUNet (MONAI's default features), AttentionUnet
(channels 16-256): MONAI's defaults or tutorial sizes, in 1 and out 2. Methods: tCURLoRA, LoRA-PT (default
``by_shape`` grouping, ``conv_layout="kernel"``) and HyPS (its default ``d=2`` serial branch), at ``--r`` (default:
each method's default r; 8 with ``--targets whole``).

    python benchmarks/adapter_sizes.py                                  # default presets, all networks and methods
    python benchmarks/adapter_sizes.py --targets whole --networks unetr_b segresnet swinunetr_48 --stem whole_cpu
    python benchmarks/adapter_sizes.py --networks segresnet --methods tcurlora

Writes ``benchmarks/results/<stem>.json`` and ``.md`` (stem ``adapter_sizes_cpu``, ``adapter_sizes_whole_cpu``).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python benchmarks/<script>.py): the checkout's root, for _common
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from benchmarks._common import MB, RESULTS_DIR, Stopwatch, machine_info, print_written, versions, write_result


def build_network(name: str, seed: int = 0) -> nn.Module:
    from monai.networks import nets

    torch.manual_seed(seed)
    builders = {
        "unetr_b": lambda: nets.UNETR(in_channels=1, out_channels=2, img_size=96, feature_size=16, hidden_size=768,
                                      mlp_dim=3072, num_heads=12, proj_type="conv", norm_name="instance",
                                      dropout_rate=0.0),
        "segresnet": lambda: nets.SegResNet(spatial_dims=3, in_channels=1, out_channels=2, init_filters=16,
                                            blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1)),
        "swinunetr_48": lambda: nets.SwinUNETR(in_channels=1, out_channels=2, feature_size=48),
        "swinunetr_v2": lambda: nets.SwinUNETR(in_channels=1, out_channels=2, feature_size=48, use_v2=True),
        "vit": lambda: nets.ViT(in_channels=1, img_size=96, patch_size=16, classification=True, num_classes=2),
        "vitautoenc": lambda: nets.ViTAutoEnc(in_channels=1, img_size=96, patch_size=16),
        "unet": lambda: nets.UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256),
                                  strides=(2, 2, 2, 2), num_res_units=2),
        "dynunet": lambda: nets.DynUNet(spatial_dims=3, in_channels=1, out_channels=2, kernel_size=[3] * 5,
                                        strides=[1, 2, 2, 2, 2], upsample_kernel_size=[2] * 4),
        "basicunet": lambda: nets.BasicUNet(spatial_dims=3, in_channels=1, out_channels=2),
        "attentionunet": lambda: nets.AttentionUnet(spatial_dims=3, in_channels=1, out_channels=2,
                                                    channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2)),
    }
    if name not in builders:
        raise SystemExit(f"unknown network {name!r}: use one of {', '.join(builders)}")
    return builders[name]()


NETWORKS = ["unetr_b", "swinunetr_48", "swinunetr_v2", "vit", "vitautoenc", "segresnet", "unet", "dynunet",
            "basicunet", "attentionunet"]
METHODS = ["tcurlora", "lorapt", "hyps"]


def whole_network_targets(net: nn.Module) -> list[str]:
    """Every nn.Linear and every groups=1 convolution whose kernel has more than one position, in module order."""
    from peft_tensor.tuners._targets import is_conv

    return [n for n, m in net.named_modules() if isinstance(m, nn.Linear)
            or (is_conv(m) and m.groups == 1 and m.weight.shape[2:].numel() > 1)]


def config_for(method: str, targets: list[str] | None, r: int):
    from peft_tensor import HyPSConfig, LoraPTConfig, TCURLoraConfig

    cls = {"tcurlora": TCURLoraConfig, "lorapt": LoraPTConfig, "hyps": HyPSConfig}[method]
    if targets is None:  # the network's preset, default rank_cap
        return cls(r=r)
    # a full-match regex of the names, so that no name also matches another module as a suffix
    return cls(r=r, target_modules="^(" + "|".join(re.escape(t) for t in targets) + ")$", rank_cap=True)


def measure(network: str, method: str, r: int | None, targets_mode: str = "preset") -> dict:
    from peft import get_peft_model

    from peft_tensor.registry import get_method

    net = build_network(network)
    targets = whole_network_targets(net) if targets_mode == "whole" else None
    r = r if r is not None else get_method(method).config_cls().r
    n_base = sum(p.numel() for p in net.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watch = Stopwatch()
        pm = get_peft_model(net, config_for(method, targets, r))
        wall, cpu = watch.elapsed()
    config = pm.peft_config["default"]
    preset = sorted(config.target_modules) if targets is None else None
    targets = [n for n, m in pm.get_base_model().named_modules() if type(m).__module__.startswith("peft_tensor")
               and hasattr(m, "base_layer")] if targets is None else targets
    capped = [str(w.message) for w in caught if "lowered r" in str(w.message)]
    n_capped = int(re.search(r"for (\d+) (group|layer)", capped[0]).group(1)) if capped else 0
    trainable, _ = pm.get_nb_trainable_parameters()
    if hasattr(pm.base_model, "describe_groups"):
        units = len(pm.base_model.describe_groups())
    else:
        units = len(targets)
    with tempfile.TemporaryDirectory() as tmp:
        pm.save_pretrained(tmp)
        size = (Path(tmp) / "adapter_model.safetensors").stat().st_size
    return {"network": network, "method": method, "r": r, "targets": len(targets), "groups_or_layers": units,
            "capped": n_capped, "trainable": trainable, "base_params": n_base, "adapter_bytes": size,
            "setup_wall_s": wall, "setup_cpu_s": cpu, "cap_warning": capped[0] if capped else None,
            "preset": preset}


NAMES = {"tcurlora": "tCURLoRA", "lorapt": "LoRA-PT", "hyps": "HyPS", "unetr_b": "UNETR-B",
         "segresnet": "SegResNet", "swinunetr_48": "SwinUNETR-48", "swinunetr_v2": "SwinUNETR-48 v2", "vit": "ViT-B",
         "vitautoenc": "ViTAutoEnc", "unet": "UNet", "dynunet": "DynUNet", "basicunet": "BasicUNet",
         "attentionunet": "AttentionUnet"}


def markdown(res: dict) -> str:
    m = res["machine"]
    preset = res.get("targets_mode", "whole") == "preset"
    what = ("the network's preset (target_modules=None, rank_cap=None: a preset's thin layers are capped), each "
            "method at its default r" if preset else
            f"every nn.Linear and every groups=1 convolution with a kernel larger than 1 (1-channel input convolution "
            f"included), r={res['r']}, rank_cap=True")
    mode = res.get("targets_mode", "whole")
    lines = [f"# Adapters on full-size MONAI networks: trainable parameters and adapter file size ({mode} targets)",
             "",
             f"Command: `{res['command']}`", "",
             f"Machine: {m['cpu']}, {m['logical_cores']} logical cores, torch {res['versions']['torch']}, "
             f"peft_tensor {res['versions']['peft_tensor']} ({res['versions'].get('git_commit')}). Targets: {what}; "
             "no modules_to_save. Groups: tCURLoRA / LoRA-PT group tensors (by_shape, conv_layout='kernel'), HyPS: "
             "adapted layers; capped: how many of them rank_cap lowered below r. File: adapter_model.safetensors as "
             "save_pretrained writes it (1 MB = 2^20 bytes).", "",
             "| network | method | r | targets | groups / layers | capped | trainable | % of base | adapter file MB | "
             "set-up wall s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in res["rows"]:
        lines.append(
            f"| {NAMES[row['network']]} | {NAMES[row['method']]} | {row['r']} | {row['targets']} | "
            f"{row['groups_or_layers']} | {row['capped']} | {row['trainable']:,} | "
            f"{100 * row['trainable'] / row['base_params']:.3f} | {row['adapter_bytes'] / MB:.3f} | "
            f"{row['setup_wall_s']:.1f} |")
    if preset:
        lines += ["", "Default targets (`peft_tensor.preset_for`):", ""]
        seen = {}
        for row in res["rows"]:
            seen.setdefault(row["network"], row["preset"])
        for net, names in seen.items():
            lines.append(f"- {NAMES[net]}: {', '.join(f'`{n}`' for n in names or [])}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--networks", nargs="+", default=NETWORKS, choices=NETWORKS)
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--targets", choices=["preset", "whole"], default="preset",
                   help="preset: target_modules=None (the network's preset); whole: every Linear and k>1 conv")
    p.add_argument("--r", type=int, default=None, help="rank (default: each method's default; 8 for --targets whole)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--stem", default=None, help="default adapter_sizes_cpu (preset) / adapter_sizes_whole_cpu")
    p.add_argument("--out", default=str(RESULTS_DIR))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.targets == "whole" and args.r is None:
        args.r = 8
    stem = args.stem or ("adapter_sizes_cpu" if args.targets == "preset" else "adapter_sizes_whole_cpu")
    res = {"command": " ".join(["python", "benchmarks/adapter_sizes.py",
                                *(argv if argv is not None else sys.argv[1:])]),
           "machine": machine_info(torch.get_num_threads()), "versions": versions(), "r": args.r,
           "targets_mode": args.targets, "rows": []}
    for network in args.networks:
        for method in args.methods:
            row = measure(network, method, args.r, args.targets)
            res["rows"].append(row)
            print(f"{network:13s} {method:9s} trainable {row['trainable']:>10,} file {row['adapter_bytes'] / MB:8.3f} "
                  f"MB  capped {row['capped']:3d}  set-up {row['setup_wall_s']:.1f} s", file=sys.stderr, flush=True)
    print_written(*write_result(res, args.out, stem, markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
