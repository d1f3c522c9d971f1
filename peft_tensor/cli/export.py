"""``peft-tensor export``: an adapter merged into its base network, written as a MONAI bundle folder."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    export = subparsers.add_parser(
        "export", help="merge an adapter into its base network and write a MONAI bundle (configs/, models/model.pt, "
        "models/model.ts)",
        description="Rebuild base network + adapter from SOURCE (an adapter directory or Hub repo id; the base "
        "network from its peft_tensor.json, or --base), merge the adapter into a copy of the network and write a "
        "MONAI bundle folder that monai.bundle loads: configs/inference.json (network_def), configs/metadata.json, "
        "models/model.pt (state dict) and models/model.ts (TorchScript).",
    )
    export.add_argument("source", help="adapter directory or Hub repo id")
    export.add_argument("--out", required=True, help="bundle folder to write")
    export.add_argument("--base", help="the pretrained base network: anything peft_tensor.load_network reads (bundle "
                        "folder or name, checkpoint file, folder with peft_tensor.json or backbone.json); default: "
                        "the base network recorded in the adapter's peft_tensor.json")
    export.add_argument("--revision", help="adapter revision (branch, tag or commit) on the Hub")
    export.add_argument("--subfolder", help="adapter subfolder")
    export.add_argument("--allow-pickle", action="store_true",
                        help="accept pickled files (base checkpoint or adapter) -- only from authors you trust")
    export.add_argument("--trust-remote-code", action="store_true",
                        help="allow untrusted classes and constructor arguments that read files or URLs "
                        "(pretrained_url, cache_dir, ...) in the network configs read from SOURCE / --base -- only "
                        "for sources you trust")
    export.add_argument("--roi", type=int, nargs="+", metavar="N",
                        help="inference window for the bundle's SlidingWindowInferer and the TorchScript check "
                        "(default: the network's img_size)")
    export.add_argument("--no-torchscript", action="store_true", help="do not write models/model.ts")
    export.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    export.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    import json

    from peft_tensor.hub import load_pretrained
    from peft_tensor.networks import export_bundle, load_network

    base = None
    if args.base:
        base, report = load_network(args.base, allow_pickle=args.allow_pickle,
                                    trust_remote_code=args.trust_remote_code)
        print(report)
    model = load_pretrained(args.source, revision=args.revision, subfolder=args.subfolder, base_model=base,
                            allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
    out = export_bundle(model, args.out, roi_size=args.roi, torchscript=not args.no_torchscript,
                        overwrite=args.overwrite)
    meta = json.loads((out / "configs" / "metadata.json").read_text(encoding="utf-8"))["peft_tensor"]
    ts = meta.get("torchscript") or {}
    merged = ", ".join(f"{n} ({t})" for n, t in (meta.get("merged_adapters") or {}).items())
    print(f"merged {merged} into {meta['network']}")
    print(f"wrote MONAI bundle {out}: configs/inference.json, configs/metadata.json, models/model.pt"
          + (f", models/model.ts ({ts.get('method')}"
             + (f", checked on {ts['checked_on']}: max |diff| {ts['max_abs_error']:.1e}" if 'checked_on' in ts else "")
             + ")" if ts else ""))
    return 0
