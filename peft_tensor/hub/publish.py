"""Save adapters with their provenance and card, and publish them to the Hub in one commit per repository.

PEFT's inherited ``PeftModel.push_to_hub`` (transformers' ``PushToHubMixin``) knows nothing of the base network: on
a new repository it uploads transformers' stock card ("Model Card for Model ID", ``library_name: transformers``) and
no ``peft_tensor.json``; on a repository published from here it replaces the adapter weights but re-uploads the old
card and leaves the old ``peft_tensor.json``, which then describe the previous adapter (both checked against the
local Hub server of the tests). So publishing goes through here: save to a directory, build the card, upload every
file with one ``HfApi.create_commit``. The local directory is only read while pushing; a failed push leaves it as it
was and, since a commit is all-or-nothing on the Hub, leaves the repository as it was too.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from .._atomic import _mode_for, atomic_write_text
from ..errors import PeftTensorError, UnsafePathError
from .adapter_files import PICKLED_WEIGHTS, WEIGHTS_NAME, adapted_module_shapes, numel, tensor_shapes
from .cards import build_adapter_card, build_base_weights_card, eval_results_from, eval_results_to_json
from .provenance import (
    FORMAT_VERSION,
    PROVENANCE_FILE,
    BaseNetwork,
    WeightsRef,
    describe_network,
    library_versions,
    local_weights,
    read_provenance,
    sha256_file,
    write_json_atomic,
)

logger = logging.getLogger(__name__)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level errors of whichever HTTP client this huggingface_hub uses (httpx2, httpx or requests)."""
    errors: list[type[BaseException]] = [OSError]
    for module, attr in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError")):
        try:
            errors.append(getattr(__import__(module), attr))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)
BASE_WEIGHTS_FILE = "model.safetensors"


class HubPublishError(PeftTensorError, RuntimeError):
    """Publishing failed; the message says why, what state the repository and local files are in, and the fix."""


class UnsafeUploadError(UnsafePathError, HubPublishError):
    """The adapter folder holds a symbolic link among the files to upload (it could send a file from elsewhere)."""


@dataclass
class PushResult:
    repo_id: str
    commit_sha: str
    commit_url: str
    files: list[str]
    base_weights: WeightsRef | None = None


# ------------------------------------------------------------------------------------------------------------ save
def save_pretrained(model, save_directory: str | os.PathLike, *, base_network: BaseNetwork | None = None,
                    base_weights: WeightsRef | str | os.PathLike | None = None, training_data: str | None = None,
                    evaluation: Any = None, license: str | None = None, datasets: list[str] | None = None,
                    tags: list[str] | None = None, selected_adapters: list[str] | None = None,
                    repo_id: str | None = None, results: dict | None = None, dataset: str | None = None,
                    details: str | None = None, base_model_name_or_path: str | None = None,
                    name: str | None = None, run_dir: str | os.PathLike | None = None, **save_kwargs) -> Path:
    """``model.save_pretrained`` (safetensors) plus ``peft_tensor.json`` (provenance) and our ``README.md`` card.

    Args:
        model: a ``PeftModel`` (any PEFT method).
        base_network: the base network record; by default read off the model (see ``build_network`` /
            ``record_network``; transformers models describe themselves through their config).
        base_weights: a ``WeightsRef`` or the path of a safetensors file with the base weights (see
            ``save_base_weights``); recorded with its sha256.
        training_data / evaluation / license / datasets / tags: what the model card states. ``evaluation`` is
            e.g. ``{"dataset": "MSD Hippocampus", "split": "test", "metrics": {"dice": 0.88, "hd95": 1.9}}``.
        results / dataset: a recipe's results (``{"test": {metric: {mean, std, n}}, "classes": [...],
            "test_per_class": {class: {metric: {...}}}}``, per-class keys optional) and the dataset's name: the
            card's results table (mean over classes and every class) and, unless ``evaluation`` is given, its
            model-index.
        details: Markdown added to the card's training section (e.g. the recipe's run summary).
        name: the card's title until it is pushed (then the repo name); default: the directory's name.
        base_model_name_or_path: written to every ``adapter_config.json``; by default the base weights' Hub repo,
            else ``base_network.source`` when that is a bundle name or repo id (not a local path).
        run_dir: the folder that travels with the adapter: ``save_directory`` (default) or its parent (a recipe
            run's folder). Local base weights inside it are recorded by a path relative to ``save_directory``, so
            the folder can be moved or copied; others by their absolute path. The sha256 is recorded either way.
    """
    save_directory = Path(save_directory)
    spec = base_network or describe_network(model)
    if base_weights is not None:
        spec.weights = base_weights if isinstance(base_weights, WeightsRef) else WeightsRef.from_file(base_weights)
    base_name = base_model_name_or_path or base_reference(spec)
    names = selected_adapters or list(model.peft_config)
    if base_name:
        for adapter_name in names:
            model.peft_config[adapter_name].base_model_name_or_path = base_name
    save_kwargs.setdefault("safe_serialization", True)
    save_peft_files(model, save_directory, selected_adapters=selected_adapters, **save_kwargs)
    active = model.active_adapter if isinstance(model.active_adapter, str) else None
    adapters = {}
    for adapter_name in names:
        sub = None if adapter_name == "default" else adapter_name
        shapes = tensor_shapes(save_directory / (sub or ""))
        entry = {"subfolder": sub, "peft_type": _peft_type_name(model.peft_config[adapter_name].peft_type),
                 "stored_values": sum(numel(s) for s in shapes.values()),
                 "module_shapes": adapted_module_shapes(model, adapter_name)}
        if adapter_name == active:
            entry["trainable_params"], entry["all_params"] = model.get_nb_trainable_parameters()
        adapters[adapter_name] = entry
    record_spec = copy.copy(spec)
    if spec.weights is not None:  # a file inside the run folder: recorded relative to this folder, so it can move
        record_spec.weights = spec.weights.for_record(save_directory, run_dir)
    record = {
        "format": "peft_tensor.provenance",
        "format_version": FORMAT_VERSION,
        "written_by": library_versions(),
        "base_network": record_spec.to_dict(),
        "adapters": adapters,
        "card": card_record(training_data=training_data, evaluation=evaluation, license=license, datasets=datasets,
                            tags=tags, results=results, dataset=dataset, details=details, name=name),
    }
    write_json_atomic(save_directory / PROVENANCE_FILE, record)
    card = build_adapter_card(save_directory, record, repo_id=repo_id)
    atomic_write_text(save_directory / "README.md", str(card))
    return save_directory


def save_peft_files(model, save_directory: Path, **kwargs) -> None:
    """``model.save_pretrained`` into a fresh folder beside ``save_directory`` (same filesystem), then each file moved
    into place with ``os.replace``.

    PEFT writes ``README.md`` and ``adapter_config.json`` with plain ``open(path, "w")``: in place, that writes through
    a symbolic link planted at the destination, and a kill mid-save leaves the files truncated. Here a failure inside
    PEFT leaves the destination as it was, and ``os.replace`` replaces a link at the destination instead of following
    it. A subfolder (named adapters) that is a symbolic link in the destination is refused before anything moves.
    """
    if save_directory.is_file():
        raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")
    save_directory.mkdir(parents=True, exist_ok=True)
    real = save_directory.resolve()
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{real.name}.saving-", dir=real.parent))
    except OSError:  # the parent is not writable: a hidden folder inside (still the same filesystem)
        staging = Path(tempfile.mkdtemp(prefix=".saving-", dir=real))
    try:
        model.save_pretrained(str(staging), **kwargs)
        _move_into_place(staging, save_directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_into_place(staging: Path, dest: Path) -> None:
    moves, folders = [], []
    for dirpath, dirnames, filenames in os.walk(staging):
        dirnames.sort()
        rel = Path(dirpath).relative_to(staging)
        if rel != Path("."):
            target = dest / rel
            if target.is_symlink() or (target.exists() and not target.is_dir()):
                raise UnsafePathError(
                    f"{target} is a symbolic link or a file where the adapter subfolder {rel.as_posix()} goes: "
                    "saving would write outside the folder. Remove it (or save to a fresh directory). Nothing "
                    f"was written to {dest}.")
            folders.append(target)
        # the weights first, the config and the card last: a kill between moves leaves every file whole
        last = {"adapter_config.json": 1, "README.md": 2}
        names = sorted(filenames, key=lambda n: last.get(n, 0))
        moves += [(Path(dirpath) / name, dest / rel / name) for name in names]
    for folder in folders:
        folder.mkdir(exist_ok=True)
    for src, dst in moves:
        os.chmod(src, _mode_for(dst))
        with open(src, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(src, dst)


def _peft_type_name(peft_type) -> str:
    return str(getattr(peft_type, "value", peft_type))


def base_reference(spec: BaseNetwork | dict | None) -> str | None:
    """What ``adapter_config.json``'s ``base_model_name_or_path`` should say: the base weights' Hub repo, else the
    recorded source when it is a bundle name or repo id rather than a local path; None otherwise."""
    if isinstance(spec, dict):
        spec = BaseNetwork.from_dict(spec)
    if spec is None:
        return None
    if spec.weights is not None and spec.weights.repo_id:
        return spec.weights.repo_id
    source = spec.source
    if source and not Path(source).expanduser().exists() and not os.path.isabs(source) \
            and not source.endswith((".pt", ".pth", ".ckpt", ".safetensors", ".bin")):
        return source
    return None


def card_record(*, training_data: str | None = None, evaluation: Any = None, license: str | None = None,
                datasets: list[str] | None = None, tags: list[str] | None = None, results: dict | None = None,
                dataset: str | None = None, details: str | None = None, name: str | None = None) -> dict:
    """The ``card`` section of ``peft_tensor.json`` (what :func:`~peft_tensor.hub.cards.build_adapter_card` reads):
    the arguments of :func:`save_pretrained` that the card states, empty ones left out. ``results`` + ``dataset``
    give the model-index unless ``evaluation`` is given."""
    if results is not None and evaluation is None and (results.get("test") or {}):
        evaluation = {"dataset": dataset, "results": results}
    return {k: v for k, v in {
        "training_data": training_data, "license": license, "datasets": datasets, "tags": tags,
        "eval_results": eval_results_to_json(eval_results_from(evaluation)) or None,
        "results": _card_results(results), "details": details, "name": name,
    }.items() if v}


def _card_results(results: dict | None) -> dict | None:
    """The parts of a recipe's results the card reports (JSON values only)."""
    if not results:
        return None
    keep = {k: results[k] for k in ("test", "classes", "test_per_class") if results.get(k)}
    return keep or None


# ------------------------------------------------------------------------------------------------------------ push
def push_to_hub(adapter, repo_id: str, *, token: str | bool | None = None, private: bool | None = None,
                revision: str | None = None, commit_message: str | None = None, create_repo: bool = True,
                base_weights_repo: str | None = None, base_weights: WeightsRef | str | os.PathLike | None = None,
                allow_pickle: bool = False, endpoint: str | None = None, **save_kwargs) -> PushResult:
    """Publish an adapter (a ``PeftModel`` or a saved directory) to ``repo_id`` in a single commit.

    Uploaded: every adapter file of the directory (``adapter_model.safetensors``, ``adapter_config.json``, their
    subfolders for extra adapters), ``peft_tensor.json`` and a freshly built ``README.md`` card. Only regular files
    inside the directory go up: a symbolic link among them (to a file or a folder, inside or outside) raises
    :class:`UnsafeUploadError` naming it, before anything is uploaded.

    ``base_weights_repo``: also publish the base weights (``base_weights`` path, or the local file recorded in
    ``peft_tensor.json``) to that repository first, in its own commit, and record the pinned Hub reference
    (repo, commit sha, file, sha256) in the uploaded ``peft_tensor.json``. The local directory is never modified.

    ``token`` defaults to huggingface_hub's own lookup (``HF_TOKEN``, then the stored login); ``endpoint`` to
    ``HF_ENDPOINT``. Tokens are never written to disk or logged.
    """
    if not isinstance(adapter, (str, os.PathLike)):
        with tempfile.TemporaryDirectory(prefix="peft-tensor-push-") as tmp:
            save_pretrained(adapter, tmp, repo_id=repo_id, base_weights=base_weights, **save_kwargs)
            return push_to_hub(tmp, repo_id, token=token, private=private, revision=revision,
                               commit_message=commit_message, create_repo=create_repo,
                               base_weights_repo=base_weights_repo,
                               allow_pickle=allow_pickle, endpoint=endpoint)
    if save_kwargs:
        raise TypeError(f"push_to_hub got unexpected arguments for a directory: {sorted(save_kwargs)}")
    adapter_dir = Path(adapter)
    files = _files_to_upload(adapter_dir, allow_pickle)
    record = read_provenance(adapter_dir)
    api = HfApi(endpoint=endpoint, token=token)

    pushed_weights = None
    if base_weights_repo is not None:
        if record is None or not record.get("base_network"):
            raise HubPublishError(f"{adapter_dir} has no {PROVENANCE_FILE} with a base network; cannot attach base "
                                  "weights. Save it with peft_tensor.hub.save_pretrained.")
        if isinstance(base_weights, WeightsRef):
            base_weights = base_weights.path
        recorded = record["base_network"].get("weights") or {}
        local = base_weights
        if not local and recorded.get("path"):  # relative to the record's folder, hash-checked
            local = local_weights(BaseNetwork.from_dict({**record["base_network"]}).weights, adapter_dir)
        if not local:
            raise HubPublishError("base_weights_repo given but no base weights file: pass base_weights=PATH.")
        pushed_weights = push_base_weights(local, base_weights_repo, api=api, private=private,
                                           create_repo=create_repo, base_network=record["base_network"],
                                           license=(record.get("card") or {}).get("license"))
        record["base_network"]["weights"] = pushed_weights.to_dict()

    weights = ((record or {}).get("base_network") or {}).get("weights") or {}
    if weights and not weights.get("repo_id"):
        logger.warning("%s records its base weights only as the local file %s: others cannot rebuild the network "
                       "from %s. Publish them too: base_weights_repo= (CLI: --base-weights-repo).", adapter_dir,
                       weights.get("path"), repo_id)
    card = build_adapter_card(adapter_dir, record, repo_id=repo_id)
    base_name = base_reference((record or {}).get("base_network"))
    with contextlib.ExitStack() as opened:
        operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=_upload_source(adapter_dir, rel, base_name,
                                                                                          opened))
                      for rel in files if rel not in ("README.md", PROVENANCE_FILE)]
        if record is not None:
            import json

            source = (record.get("base_network") or {}).get("source")
            if source and (os.path.isabs(source) or Path(source).expanduser().exists()):
                record["base_network"]["source"] = Path(source).name  # a local path says nothing to others
            operations.append(CommitOperationAdd(PROVENANCE_FILE, (json.dumps(record, indent=2) + "\n").encode()))
        operations.append(CommitOperationAdd("README.md", str(card).encode()))
        message = commit_message or f"Upload {record_method(adapter_dir)} adapter with peft-tensor"
        info = _commit(api, repo_id, operations, message, revision=revision, private=private,
                       create_repo=create_repo, local_dir=adapter_dir)
    return PushResult(repo_id, info.oid, info.commit_url, [op.path_in_repo for op in operations], pushed_weights)


def _upload_source(adapter_dir: Path, rel: str, base_name: str | None, opened: contextlib.ExitStack):
    """The file as uploaded: ``adapter_config.json`` gets ``base_model_name_or_path`` = the base's Hub repo / bundle
    name (the local file is not modified); every other file is uploaded as it is, from a handle opened without
    following a symbolic link (a link swapped in after the check is refused, not read) and kept open until the
    commit is done."""
    path = adapter_dir / rel
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise _unsafe_upload(adapter_dir, [rel]) if os.path.islink(path) else exc
    fh = opened.enter_context(os.fdopen(fd, "rb"))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        raise _unsafe_upload(adapter_dir, [rel])
    if path.name != "adapter_config.json" or not base_name:
        return fh
    import json

    config = json.loads(fh.read().decode("utf-8"))
    fh.seek(0)
    if config.get("base_model_name_or_path") == base_name:
        return fh
    config["base_model_name_or_path"] = base_name
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


def push_base_weights(weights_file: str | os.PathLike, repo_id: str, *, api: HfApi | None = None,
                      token: str | bool | None = None, private: bool | None = None, create_repo: bool = True,
                      base_network: dict | None = None, endpoint: str | None = None,
                      license: str | None = None) -> WeightsRef:
    """Publish a base-weights safetensors file to its own repository (one commit); return the pinned reference.

    Its card (``model_cards/base_weights_card.md``, :func:`~peft_tensor.hub.cards.build_base_weights_card`) has the
    adapter cards' ``library_name`` (``peft-tensor``) and ``pipeline_tag``, and their common tags
    (:data:`~peft_tensor.hub.cards.BASE_TAGS`); ``license`` defaults to ``unknown`` (``push_to_hub`` passes the
    adapter's)."""
    weights_file = Path(weights_file)
    if weights_file.suffix != ".safetensors":
        raise HubPublishError(f"Base weights must be a .safetensors file, got {weights_file.name}.")
    if not weights_file.is_file():
        raise HubPublishError(f"Base weights file {weights_file} not found.")
    api = api or HfApi(endpoint=endpoint, token=token)
    digest = sha256_file(weights_file)
    desc = BaseNetwork.from_dict(base_network).describe() if base_network else "a base network"
    readme = str(build_base_weights_card(desc, BASE_WEIGHTS_FILE, digest, license=license))
    operations = [CommitOperationAdd(BASE_WEIGHTS_FILE, str(weights_file)),
                  CommitOperationAdd("README.md", readme.encode())]
    info = _commit(api, repo_id, operations, "Upload base weights with peft-tensor", revision=None, private=private,
                   create_repo=create_repo, local_dir=weights_file.parent)
    return WeightsRef(sha256=digest, size=weights_file.stat().st_size, repo_id=repo_id, revision=info.oid,
                      filename=BASE_WEIGHTS_FILE)


def record_method(adapter_dir: Path) -> str:
    from .adapter_files import read_config_file

    try:
        return str(read_config_file(adapter_dir)["peft_type"])
    except PeftTensorError:
        return "PEFT"


UPLOADED_SUFFIXES = (".json", ".safetensors", ".md", ".bin")


def _unsafe_upload(adapter_dir: Path, links: list[str]) -> UnsafeUploadError:
    return UnsafeUploadError(
        f"{adapter_dir} holds {'a symbolic link' if len(links) == 1 else 'symbolic links'} among the files to upload: "
        f"{', '.join(links)}. push uploads only the regular files inside the adapter folder: a link could send a file "
        "from elsewhere (a key, another project's data) to the Hub. Replace each link by a copy of the file it "
        "points to, or remove it, then push again. Nothing was uploaded.")


def _files_to_upload(adapter_dir: Path, allow_pickle: bool) -> list[str]:
    """The adapter folder's files to upload (relative POSIX paths): regular files only, none hidden. A symbolic link
    to a file or folder that would be uploaded (or a file whose real path leaves the folder) is refused, before
    anything is read or sent."""
    if not adapter_dir.is_dir():
        raise HubPublishError(f"{adapter_dir} is not a directory; pass the folder written by save_pretrained.")
    root = os.path.realpath(adapter_dir)
    found, links = [], []
    for dirpath, dirnames, filenames in os.walk(adapter_dir):  # does not descend into linked folders
        base = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        links += [(base / d).relative_to(adapter_dir).as_posix() for d in dirnames if (base / d).is_symlink()]
        for name in sorted(filenames):
            path = base / name
            rel = path.relative_to(adapter_dir).as_posix()
            if name.startswith(".") or path.suffix not in UPLOADED_SUFFIXES:
                continue
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode) or os.path.commonpath([root, os.path.realpath(path)]) != root:
                links.append(rel)
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            if name == PICKLED_WEIGHTS and not allow_pickle:
                logger.warning("Not uploading %s: pickled weights are skipped unless allow_pickle=True.", rel)
                continue
            found.append(rel)
    if links:
        raise _unsafe_upload(adapter_dir, sorted(links))
    found.sort()
    configs = [f for f in found if f.endswith("adapter_config.json")]
    if not configs:
        raise HubPublishError(f"{adapter_dir} holds no adapter_config.json: not an adapter directory.")
    for cfg in configs:
        folder = cfg.rsplit("/", 1)[0] + "/" if "/" in cfg else ""
        if folder + WEIGHTS_NAME not in found and not (allow_pickle and folder + PICKLED_WEIGHTS in found):
            raise HubPublishError(f"{adapter_dir / folder} has {cfg} but no {WEIGHTS_NAME}; save with "
                                  "safe_serialization=True.")
    return found


def _commit(api: HfApi, repo_id: str, operations, message: str, *, revision, private, create_repo, local_dir):
    """One ``create_repo`` (optional) + one ``create_commit``; every failure becomes a HubPublishError."""
    where = f"{api.endpoint}/{repo_id}"
    unchanged = f"Nothing was committed to {repo_id}; the local files in {local_dir} are unchanged."
    try:
        if create_repo:
            api.create_repo(repo_id, private=private, exist_ok=True)
        return api.create_commit(repo_id, operations, commit_message=message, revision=revision)
    except RepositoryNotFoundError as exc:
        raise HubPublishError(
            f"Repository {repo_id} not found at {api.endpoint} (or your token cannot write to it). {unchanged} "
            "Create it first (or push without --no-create-repo), and check HF_TOKEN / HF_ENDPOINT."
        ) from exc
    except RevisionNotFoundError as exc:
        raise HubPublishError(f"Branch {revision!r} does not exist in {repo_id}. {unchanged}") from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        hint = ("The Hub had an internal error; retry later." if isinstance(status, int) and status >= 500
                else "Check the repository id, your token's write permission and HF_ENDPOINT.")
        raise HubPublishError(f"The Hub refused the upload to {where} (HTTP {status}). {unchanged} {hint}") from exc
    except (*_transport_errors(), RuntimeError) as exc:
        if isinstance(exc, PeftTensorError):
            raise
        raise HubPublishError(
            f"The connection to {api.endpoint} broke off during the upload to {repo_id} ({type(exc).__name__}). "
            f"{unchanged} Check the network and push again."
        ) from exc
    except ValueError as exc:  # invalid card metadata reported by the Hub's validate-yaml
        raise HubPublishError(f"The Hub rejected the upload to {repo_id}: {exc}. {unchanged}") from exc

