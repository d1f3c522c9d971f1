"""``peft-tensor push | info | load``: publish and inspect adapters on the Hub.

The Hub endpoint and token come from huggingface_hub's usual sources (``HF_ENDPOINT``, ``HF_TOKEN`` or the stored
login); there is deliberately no ``--token`` flag, so a token never appears in shell history or process lists.
"""

from __future__ import annotations

import argparse
import json

TRUST_REMOTE_CODE_HELP = (
    "allow untrusted classes and constructor arguments that read files or URLs (pretrained_url, cache_dir, ...) in "
    "the base network recorded by the source -- only for sources you trust")


def register(subparsers) -> None:
    push = subparsers.add_parser(
        "push", help="publish an adapter directory to the Hub in one commit (card + provenance included)",
        description="Publish ADAPTER_DIR (written by save_pretrained) to REPO_ID in a single commit: adapter files, "
        "peft_tensor.json and a freshly built model card. Uses HF_ENDPOINT and HF_TOKEN like huggingface_hub.",
    )
    push.add_argument("adapter_dir")
    push.add_argument("repo_id")
    push.add_argument("--revision", help="branch to commit to (default: main)")
    push.add_argument("--message", help="commit message")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--no-create-repo", action="store_true", help="fail if the repository does not exist yet")
    push.add_argument("--base-weights", metavar="PATH", help="base weights (.safetensors) to publish with it")
    push.add_argument("--base-weights-repo", metavar="REPO_ID",
                      help="publish the base weights to this repository first and pin them in peft_tensor.json")
    push.add_argument("--allow-pickle", action="store_true", help="also upload pickled adapter_model.bin files")
    push.set_defaults(func=_push)

    info = subparsers.add_parser("info", help="describe an adapter directory or Hub repo without loading a model")
    info.add_argument("source", help="adapter directory or Hub repo id")
    info.add_argument("--revision")
    info.add_argument("--subfolder")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_info)

    load = subparsers.add_parser(
        "load", help="load an adapter (base network + weights + adapter) and report; fills the cache for offline use")
    load.add_argument("source", help="adapter directory or Hub repo id")
    load.add_argument("--revision")
    load.add_argument("--subfolder")
    load.add_argument("--allow-pickle", action="store_true", help="accept a pickled adapter_model.bin")
    load.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
    load.set_defaults(func=_load)


def _push(args: argparse.Namespace) -> int:
    from peft_tensor.hub import push_to_hub

    if args.base_weights and not args.base_weights_repo:
        raise ValueError("--base-weights needs --base-weights-repo (the repository the weights go to)")
    result = push_to_hub(
        args.adapter_dir, args.repo_id, revision=args.revision, commit_message=args.message,
        private=True if args.private else None, create_repo=not args.no_create_repo,
        base_weights=args.base_weights, base_weights_repo=args.base_weights_repo, allow_pickle=args.allow_pickle,
    )
    if result.base_weights is not None:
        print(f"base weights: {result.base_weights.describe()}")
    print(f"pushed {len(result.files)} files to {result.repo_id} @ {result.commit_sha}")
    print(result.commit_url)
    return 0


def _info(args: argparse.Namespace) -> int:
    from peft_tensor.hub import adapter_info, format_info

    info = adapter_info(args.source, revision=args.revision, subfolder=args.subfolder)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def _load(args: argparse.Namespace) -> int:
    from peft_tensor.hub import load_pretrained

    model = load_pretrained(args.source, revision=args.revision, subfolder=args.subfolder,
                            allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
    config = model.peft_config[model.active_adapter]
    base = type(model.get_base_model())
    total = sum(p.numel() for p in model.parameters())
    print(f"loaded {getattr(config.peft_type, 'value', config.peft_type)} adapter onto "
          f"{base.__module__}.{base.__name__} ({total:,} parameters)")
    return 0
