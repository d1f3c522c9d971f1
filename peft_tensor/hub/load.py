"""Load adapters -- ours or PEFT-native ones -- from a directory or a Hub repository in one call.

``load_pretrained(source)`` resolves ``source`` (a local directory, or a repo id fetched with
``snapshot_download``, honouring ``revision``, ``subfolder``, ``HF_HUB_OFFLINE`` and the cache), checks the
adapter before anything is built or modified (known ``peft_type``, safetensors only unless ``allow_pickle``,
tensor shapes against the base network), rebuilds the base network from ``peft_tensor.json`` (class, constructor
arguments, weights checked by sha256) unless ``base_model`` is given, and returns a ``PeftModel``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import AdapterLoadError
from ..loading import check_adapter_compatible, from_pretrained, load_adapter_checked, restoring
from ..tuners._loading_context import loading_adapter
from .adapter_files import (
    CONFIG_NAME,
    PICKLED_WEIGHTS,
    WEIGHTS_NAME,
    check_peft_type,
    check_shapes,
    read_config_file,
    tensor_shapes,
)
from .provenance import (
    PROVENANCE_FILE,
    TRUSTED_MODULE_ROOTS,
    BaseNetwork,
    local_weights,
    read_provenance,
    remote_code_trusted,
    sha256_file,
)

logger = logging.getLogger(__name__)


class UnsafeWeightsError(AdapterLoadError):
    """The adapter's weights are only available as a pickle, which can run code when loaded."""


@dataclass
class ResolvedAdapter:
    """Local files of one source: ``root`` holds ``peft_tensor.json``; ``folders`` maps adapter name -> folder."""

    root: Path
    folders: dict[str, Path]
    repo_id: str | None = None
    commit: str | None = None
    record: dict | None = None
    remote_files: list[str] = field(default_factory=list)


def _is_local(source: str | os.PathLike) -> bool:
    return Path(source).expanduser().is_dir()


def resolve(source: str | os.PathLike, *, adapters: dict[str, str | None], revision: str | None = None,
            allow_pickle: bool = False, token: str | bool | None = None, cache_dir: str | None = None,
            local_files_only: bool = False, endpoint: str | None = None,
            extra_patterns: tuple[str, ...] = ()) -> ResolvedAdapter:
    """Local folder(s) for the requested adapters of ``source`` (downloading only their files from the Hub)."""
    if _is_local(source):
        root = Path(source).expanduser()
        resolved = ResolvedAdapter(root, {n: root / (sub or "") for n, sub in adapters.items()})
    else:
        resolved = _download(str(source), adapters, revision, allow_pickle, token, cache_dir, local_files_only,
                             endpoint, extra_patterns)
    resolved.record = read_provenance(resolved.root)
    for name, folder in resolved.folders.items():
        sub = adapters[name]
        if not (folder / CONFIG_NAME).is_file():
            avail = ", ".join(sorted({f.rsplit("/", 1)[0] if "/" in f else "(root)"
                                      for f in resolved.remote_files if f.endswith(CONFIG_NAME)})) or "none listed"
            raise AdapterLoadError(
                f"No {CONFIG_NAME} in {source}{'/' + sub if sub else ''}"
                f"{' at revision ' + revision if revision else ''}. Adapters available: {avail}."
            )
        if not (folder / WEIGHTS_NAME).is_file():
            if (folder / PICKLED_WEIGHTS).is_file() and allow_pickle:
                continue
            has_bin = (folder / PICKLED_WEIGHTS).is_file() or (f"{sub}/{PICKLED_WEIGHTS}" if sub else PICKLED_WEIGHTS
                                                                 ) in resolved.remote_files
            if has_bin:
                raise UnsafeWeightsError(
                    f"{source}{'/' + sub if sub else ''} has only a pickled {PICKLED_WEIGHTS} and no {WEIGHTS_NAME}. "
                    "Unpickling a file from someone else can run arbitrary code, so it is refused by default. If you "
                    "trust its author, pass allow_pickle=True (CLI: --allow-pickle); better, ask for a safetensors "
                    "upload."
                )
            raise AdapterLoadError(f"{source}{'/' + sub if sub else ''} has no {WEIGHTS_NAME}.")
    return resolved


def _download(repo_id, adapters, revision, allow_pickle, token, cache_dir, local_files_only, endpoint,
              extra_patterns) -> ResolvedAdapter:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    names = [CONFIG_NAME, WEIGHTS_NAME, PROVENANCE_FILE] + ([PICKLED_WEIGHTS] if allow_pickle else [])
    patterns = [PROVENANCE_FILE, "README.md", *extra_patterns]
    for sub in adapters.values():
        patterns += [f"{sub}/{n}" if sub else n for n in names]
    remote_files: list[str] = []
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=patterns, token=token,
                                 cache_dir=cache_dir, local_files_only=local_files_only, endpoint=endpoint)
    except RevisionNotFoundError as exc:
        raise AdapterLoadError(f"Revision {revision!r} not found in {repo_id}; use a branch name or a full commit "
                               "sha from the repository's history.") from exc
    except RepositoryNotFoundError as exc:
        raise AdapterLoadError(
            f"Repository {repo_id} not found on the Hub (or it is private and no valid token was given). Check the "
            "repo id, HF_TOKEN and HF_ENDPOINT; if you meant a local directory, it does not exist."
        ) from exc
    except LocalEntryNotFoundError as exc:
        raise AdapterLoadError(
            f"{repo_id}{'@' + revision if revision else ''} is not in the local cache and the Hub cannot be reached "
            "(HF_HUB_OFFLINE=1 or no network). Download it once while online."
        ) from exc
    except HfHubHTTPError as exc:
        raise AdapterLoadError(f"Downloading {repo_id} failed: {exc}") from exc
    root = Path(path)
    wanted = [(sub + "/" if sub else "") + n for sub in adapters.values() for n in (CONFIG_NAME, WEIGHTS_NAME)]
    if not all((root / f).is_file() for f in wanted) and not local_files_only and not _offline():
        try:  # list the repository so the error can say what is there (e.g. only a pickled .bin)
            remote_files = HfApi(endpoint=endpoint, token=token).list_repo_files(repo_id, revision=root.name)
        except HfHubHTTPError:
            remote_files = []
    return ResolvedAdapter(root, {n: root / (sub or "") for n, sub in adapters.items()}, repo_id=repo_id,
                           commit=root.name, remote_files=remote_files)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def load_pretrained(source: str | os.PathLike, *, revision: str | None = None, subfolder: str | None = None,
                    adapter_name: str = "default", adapters: dict[str, str | None] | None = None,
                    base_model: nn.Module | None = None, is_trainable: bool = False, allow_pickle: bool = False,
                    check_base_hash: bool = True, trusted_module_roots: tuple[str, ...] = TRUSTED_MODULE_ROOTS,
                    token: str | bool | None = None, cache_dir: str | None = None, local_files_only: bool = False,
                    endpoint: str | None = None, device: str | torch.device | None = None,
                    trust_remote_code: bool = False):
    """Rebuild base network + weights + adapter(s) from a directory or a Hub repo id; returns a ``PeftModel``.

    Args:
        source: a local adapter directory or a Hub repo id (``"user/unetr-tcurlora-hippocampus"``).
        revision: branch, tag or commit sha (pin a commit to get exactly that adapter).
        subfolder: folder of the adapter inside the repo / directory (PEFT saves extra adapters in subfolders).
        adapter_name: the name the adapter gets in the returned model.
        adapters: load several adapters at once, ``{adapter_name: subfolder or None}``; the first is active.
        base_model: your own base network (with its weights) instead of the one in ``peft_tensor.json``.
        is_trainable: load for further training.
        allow_pickle: accept a pickled ``adapter_model.bin`` when there is no safetensors file.
        check_base_hash: refuse base weights whose sha256 differs from the recorded one.
        trusted_module_roots: packages whose ``nn.Module`` classes may be built from the record; within the default
            roots only the allow-list (MONAI networks, transformers models, ``torch.nn``), resolved without importing
            the module the record names.
        trust_remote_code: build a recorded class outside the allow-list, and constructor arguments that read files
            or fetch URLs (``pretrained_url``, ``cache_dir``, ...). Only for sources you trust.
        token / cache_dir / local_files_only / endpoint: as in huggingface_hub (``HF_TOKEN``, ``HF_HUB_CACHE``,
            ``HF_HUB_OFFLINE``, ``HF_ENDPOINT`` by default).
    """
    from peft import PeftModel

    adapters = dict(adapters) if adapters else {adapter_name: subfolder}
    users_model = base_model is not None
    resolved = resolve(source, adapters=adapters, revision=revision, allow_pickle=allow_pickle, token=token,
                       cache_dir=cache_dir, local_files_only=local_files_only, endpoint=endpoint)
    record = resolved.record or {}
    where = f"{source}: "
    # 1. everything that can be checked from files alone
    configs, shapes = {}, {}
    for name, folder in resolved.folders.items():
        configs[name] = read_config_file(folder)
        check_peft_type(configs[name], record, where)
        shapes[name] = tensor_shapes(folder) if (folder / WEIGHTS_NAME).is_file() else {}
    # 2. the base network
    if base_model is None:
        if not record.get("base_network"):
            raise AdapterLoadError(
                f"{where}no {PROVENANCE_FILE} records the base network (a PEFT-native adapter?). Build the network "
                "it was trained on, with its weights, and pass it: load_pretrained(source, base_model=net)."
            )
        spec = BaseNetwork.from_dict(record["base_network"])
        base_model = spec.build(trusted_module_roots=trusted_module_roots,
                                trust_remote_code=trust_remote_code or remote_code_trusted())
        if spec.weights is None:
            raise AdapterLoadError(
                f"{where}{PROVENANCE_FILE} records the base network {spec.describe()} but not its weights, so a "
                "rebuilt network would be random. Pass base_model= (the network with its pretrained weights)."
            )
        _load_base_weights(base_model, spec, resolved, check_base_hash, token, cache_dir, local_files_only,
                           endpoint)
    elif hasattr(base_model, "peft_config"):
        raise AdapterLoadError("base_model already holds adapters; pass the plain base network.")
    # 3. shapes against the still untouched base network
    for name in adapters:
        rec = _record_for_folder(record, adapters[name])
        check_shapes(base_model, shapes[name], configs[name], rec, where)
        if shapes[name]:  # tensor-group methods: the saved group tensors must fit this network's groups
            check_adapter_compatible(base_model, resolved.folders[name])
    # the caller's own base_model is put back exactly as it was if anything below fails (a rebuilt one is dropped)
    with restoring(base_model, f"Loading {source}", copy_values=users_model), loading_adapter():
        if device is not None:
            base_model.to(device)
        # 4. PEFT does the rest, through peft_tensor.from_pretrained / load_adapter_checked (validation first); a
        # pickled adapter (allow_pickle=True) goes to PEFT directly, as those refuse pickles
        names = list(adapters)
        folders = {name: str(resolved.folders[name]) for name in names}
        safe = {name: (resolved.folders[name] / WEIGHTS_NAME).is_file() for name in names}
        if safe[names[0]]:
            model = from_pretrained(base_model, folders[names[0]], adapter_name=names[0], is_trainable=is_trainable)
        else:
            model = PeftModel.from_pretrained(base_model, folders[names[0]], adapter_name=names[0],
                                              is_trainable=is_trainable)
        for name in names[1:]:
            load = load_adapter_checked if safe[name] else type(model).load_adapter
            load(model, folders[name], adapter_name=name, is_trainable=is_trainable)
    model.set_adapter(names[0])
    if not is_trainable:
        model.eval()
    return model


def _record_for_folder(record: dict, subfolder: str | None) -> dict | None:
    for entry in (record.get("adapters") or {}).values():
        if entry.get("subfolder") == subfolder:
            return entry
    return None


def _load_base_weights(base_model, spec, resolved, check_hash, token, cache_dir, local_files_only, endpoint):
    from safetensors.torch import load_file

    ref = spec.weights
    if ref.repo_id:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        try:
            path = hf_hub_download(ref.repo_id, ref.filename or "model.safetensors", revision=ref.revision,
                                   token=token, cache_dir=cache_dir, local_files_only=local_files_only,
                                   endpoint=endpoint)
        except (HfHubHTTPError, LocalEntryNotFoundError) as exc:
            raise AdapterLoadError(f"Cannot fetch the base weights {ref.describe()}: {exc}") from exc
    elif resolved.repo_id is not None and not (ref.sha256 and str(ref.path or "").endswith(".safetensors")):
        # A downloaded record naming a local file (the publisher's own machine, e.g. push then load there) is
        # looked at only as safetensors checked against its recorded sha256: nothing else a file names is read.
        raise AdapterLoadError(
            f"The adapter {resolved.repo_id} records its base weights as a local file ({ref.describe()}) without a "
            "sha256 or not as safetensors, so it is not read. Pass base_model= (the network with its pretrained "
            "weights), or ask the publisher to push them with `peft-tensor push --base-weights-repo`.")
    else:  # a path relative to the record's folder (inside the run folder), or an older record's absolute path
        path = local_weights(ref, resolved.root, check_hash)  # sha256-checked there
    if not str(path).endswith(".safetensors"):
        raise UnsafeWeightsError(f"Base weights {path} are not safetensors; refusing to unpickle them.")
    if check_hash and ref.repo_id:
        digest = sha256_file(path)
        if digest != ref.sha256:
            raise AdapterLoadError(
                f"Base weights {path} have sha256 {digest}, but the adapter was trained on weights with sha256 "
                f"{ref.sha256}. Use the recorded weights ({ref.describe()}), or pass check_base_hash=False if you "
                "know they are equivalent."
            )
    state = load_file(str(path))
    own = base_model.state_dict()
    bad = [f"{k}: file {tuple(v.shape)} vs network {tuple(own[k].shape)}" for k, v in state.items()
           if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if bad or missing or unexpected:
        raise AdapterLoadError(
            f"Base weights {path} do not fit {spec.describe()}: shape mismatches {bad[:3]}, missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}."
        )
    base_model.load_state_dict(state, strict=True)

