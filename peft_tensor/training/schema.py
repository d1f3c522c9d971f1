"""The schema of the recipe configs: one dataclass per config block, the one home of every default.

:func:`validate_config` checks a resolved config against the schema of its recipe and returns it with every default
filled in (a plain dict, so the recipes, ``config.json`` and ``peft-tensor cat`` stay plain YAML / JSON). It refuses

* an unknown key, naming its dotted path and the nearest valid key (``optim.learning_rate: unknown key; did you mean
  optim.lr?``),
* a value of the wrong type (``train.batch_size: expected int, got str 'two'``),
* a missing required key (``output_dir``, ``data``, ``model``, ``arm``, ...),

each as a :class:`ConfigError` (a ``ValueError``) whose message is one line. Blocks whose keys are not ours are
declared free-form and checked by their own rules (:func:`check_data`, :func:`check_model`, :func:`check_arm`):
``data`` (its keys depend on ``data.kind``: the layout's arguments, see :mod:`peft_tensor.data.loaders`), ``model``
(a backbone by ``name`` plus constructor arguments, or a ``_target_`` class plus its arguments) and ``arm`` (the
arm's own keys plus the PEFT method's config fields). ``peft-tensor cat <config>`` shows a config filled in.

Schemas by recipe: :data:`SCHEMAS`; :func:`infer_schema` picks one from a config's top-level keys (configs that
match none, e.g. the efficiency / vit_blocks / loader benchmark configs, are left to their own readers).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

__all__ = ["ConfigError", "SCHEMAS", "CardConfig", "DemoConfig", "DiagnoseConfig", "EvalConfig", "EvalOverride",
           "EvaluateRunConfig", "FewshotConfig", "FinetuneConfig", "LrSweepConfig", "OptimConfig", "PretrainConfig",
           "TrainConfig", "check_arm", "check_data", "check_model", "config_block", "fill_block", "infer_schema",
           "schema_keys", "validate_config"]


class ConfigError(ValueError):
    """A config key or value the schema refuses; the message is one line and starts with the dotted key."""


@contextlib.contextmanager
def config_block(path: str):
    """Attribute an error raised inside the block to the config block ``path`` (``data``, ``model.pretrained``,
    ``arm``, ...): the exception is re-raised unchanged, with ``exc.config_block = path`` unless an inner block set
    it. The recipes' command line then prints it as one line naming that block (``peft_tensor.cli.error_line``),
    whatever its type, where an unattributed error keeps its traceback."""
    try:
        yield
    except Exception as exc:
        if getattr(exc, "config_block", None) is None:
            with contextlib.suppress(AttributeError, TypeError):
                exc.config_block = path
        raise


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


def _f(default, help: str, rule: str | None = None, aliases: tuple = (), choices: tuple = ()):
    """A schema field: its default (``REQUIRED`` for none), a one-line help, an optional rule for free-form blocks
    (a function of this module, called with the value and its dotted path), other names users write for it and the
    values it may take (``choices``, compared case-insensitively; none: any value of its type)."""
    meta = {"help": help, "rule": rule, "aliases": tuple(aliases), "choices": tuple(choices)}
    if dataclasses.is_dataclass(default) and isinstance(default, type):
        return field(default_factory=default, metadata=meta)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: copy.deepcopy(d), metadata=meta)
    return field(default=default, metadata=meta)


# ---------------------------------------------------------------------------------------------------- blocks
@dataclass
class OptimConfig:
    """``optim``: the optimiser and the learning-rate schedule."""

    name: str = _f("adam", "optimiser: adam (amsgrad as in the papers) or sgd", aliases=("optimizer", "optimiser"),
                   choices=("adam", "sgd"))
    lr: float = _f(1e-3, "learning rate (of the decoder and head when an adapter's method_lr is set)",
                   aliases=("learning_rate", "learningrate", "base_lr", "rate"))
    weight_decay: float = _f(2e-5, "L2 weight decay", aliases=("wd", "decay"))
    method_lr: Optional[float] = _f(None, "learning rate of the adapter factors; null: lr (an arm's registry lr wins)")
    method_weight_decay: Optional[float] = _f(
        None, "weight decay of the adapter factors (with method_lr); null: weight_decay (an arm's registry one wins)")
    momentum: float = _f(0.0, "SGD momentum (name: sgd only)")
    amsgrad: bool = _f(True, "Adam's amsgrad variant (name: adam only)")
    poly_power: float = _f(0.9, "power of the polynomial decay (1 - step / steps) ** poly_power, per step",
                           aliases=("power", "poly"))


@dataclass
class TrainConfig:
    """``train``: the training loop."""

    steps: Optional[int] = _f(None, "optimisation steps; null: epochs * ceil(n_train / batch_size)",
                              aliases=("num_steps", "max_steps", "iterations", "iters", "n_steps"))
    epochs: Optional[int] = _f(None, "epochs (the papers' unit), used when steps is null", aliases=("num_epochs",))
    batch_size: int = _f(2, "training batch size (all processes together)", aliases=("batch", "bs"))
    patch: Optional[Union[int, list]] = _f(None, "training crop / inference window; null: model.img_size, else 96",
                                           aliases=("patch_size", "crop_size", "roi_size"))
    loss: str = _f("dice", "loss: dice (soft Dice) or dicece (Dice + cross-entropy)",
                   choices=("dice", "dicece", "dice_ce"))
    crop: str = _f("random", "crop sampling: random (uniform, the papers) or posneg (foreground-centred)",
                   choices=("random", "posneg"))
    crop_pos: float = _f(1.0, "posneg crops: weight of foreground-centred crops")
    crop_neg: float = _f(1.0, "posneg crops: weight of background-centred crops")
    checkpoint_every: int = _f(0, "save a resumable checkpoint every N steps; 0: never", aliases=("save_every",))
    val_every: int = _f(0, "validation Dice every N steps (needs a val split); 0: never",
                        aliases=("eval_every", "validate_every"))
    amp: bool = _f(True, "bfloat16 autocast on CUDA (nothing on CPU)")
    stop_after: Optional[int] = _f(None, "stop after N steps as an interruption would (tests of resuming)")


@dataclass
class EvalConfig:
    """``eval``: the sliding-window evaluation on the test cases."""

    overlap: float = _f(0.5, "sliding-window overlap")
    min_component_voxels: int = _f(0, ">0: also report *_cc metrics after removing smaller components")


@dataclass
class EvalOverride:
    """``eval`` of ``evaluate_run``: null keeps the evaluated run's own setting."""

    overlap: Optional[float] = _f(None, "sliding-window overlap; null: the run's eval.overlap")
    min_component_voxels: Optional[int] = _f(None, "component-size threshold; null: the run's")


@dataclass
class CardConfig:
    """``card``: the fine-tuned adapter's model card."""

    license: Optional[str] = _f(None, "licence of the adapter; null: the package default")
    dataset: Optional[str] = _f(None, "dataset name in the card; null: from the data block")
    tags: list = _f([], "extra Hub tags")


# ---------------------------------------------------------------------------------------------------- recipes
_DATA_HELP = "the data: kind (a layout or a dotted loader path) and its arguments (free-form, see check_data)"
_MODEL_HELP = "the network: name + constructor arguments, or _target_ + arguments (free-form, see check_model)"
_ARM_HELP = "the fine-tuning arm: name + its options and PEFT config fields (free-form, see check_arm)"


@dataclass
class _RunConfig:
    output_dir: str = _f(REQUIRED, "output folder of the run", aliases=("out_dir", "output", "outdir"))
    seed: int = _f(0, "seed of initialisation, sampling, augmentation and dropout")
    device: str = _f("auto", "auto, cpu, cuda or cuda:N", rule="check_device")
    threads: Optional[Union[int, str]] = _f(None, "CPU threads: auto (1 when the machine is busy), null (torch's), "
                                                  "N; a run saves the count it used in its config.json",
                                            rule="check_threads")
    progress: bool = _f(True, "show progress bars")


@dataclass
class PretrainConfig(_RunConfig):
    """``pretrain`` recipe."""

    data: dict = _f(REQUIRED, _DATA_HELP, rule="check_data")
    model: dict = _f(REQUIRED, _MODEL_HELP, rule="check_model")
    optim: OptimConfig = _f(OptimConfig, "optimiser and schedule", aliases=("optimizer", "optimiser"))
    train: TrainConfig = _f(TrainConfig, "training loop", rule="check_train", aliases=("training",))


@dataclass
class FinetuneConfig(PretrainConfig):
    """``finetune`` recipe."""

    arm: dict = _f(REQUIRED, _ARM_HELP, rule="check_arm", aliases=("method", "peft"))
    eval: EvalConfig = _f(EvalConfig, "test-set evaluation", aliases=("evaluation", "test"))
    card: Optional[CardConfig] = _f(None, "model card settings; null: defaults")


@dataclass
class DemoPretrainStage:
    """``pretrain`` block of the demo: laid over the demo's data / model for the pretrain recipe."""

    optim: OptimConfig = _f(OptimConfig, "optimiser and schedule")
    train: TrainConfig = _f(TrainConfig, "training loop", rule="check_train")


@dataclass
class DemoFinetuneStage(DemoPretrainStage):
    """``finetune`` block of the demo: laid over the demo's data / model for each arm's finetune run."""

    eval: EvalConfig = _f(EvalConfig, "test-set evaluation")
    arm: Optional[dict] = _f(None, "options laid under the demo arm of the same name", rule="check_arm")
    card: Optional[CardConfig] = _f(None, "model card settings; null: defaults")


@dataclass
class DemoConfig:
    """``demo`` recipe (also the few-shot and lr-sweep benchmarks' base)."""

    output_dir: str = _f("peft_tensor_demo", "output folder", aliases=("out_dir", "output"))
    seed: int = _f(0, "seed of pretraining and fine-tuning")
    device: str = _f("auto", "auto, cpu, cuda or cuda:N", rule="check_device")
    threads: Optional[Union[int, str]] = _f(None, "CPU threads: auto (1 when the machine is busy), null (torch's), "
                                                  "N; a run saves the count it used in its config.json",
                                            rule="check_threads")
    progress: bool = _f(True, "show progress bars")
    reuse_pretrained: bool = _f(True, "reuse a cached pretrained backbone of the same settings")
    data: dict = _f(REQUIRED, _DATA_HELP, rule="check_data")
    model: dict = _f(REQUIRED, _MODEL_HELP, rule="check_model")
    arms: list = _f(REQUIRED, "the arms to compare: names or {name: ..., label: ..., options}", rule="check_arms")
    pretrain: DemoPretrainStage = _f(DemoPretrainStage, "pretraining on the source task")
    finetune: DemoFinetuneStage = _f(DemoFinetuneStage, "fine-tuning of each arm on the target task")


@dataclass
class FewshotGrid:
    """``benchmark`` block of the few-shot benchmark."""

    n_train: list = _f([5, 10, 20], "training-subject counts")
    seeds: list = _f([0, 1], "fine-tuning seeds")
    workers: int = _f(1, "fine-tunes run at once, each in its own process (needs threads: N, e.g. 1)")
    resume: bool = _f(False, "keep the runs of an earlier <stem>.json made with the same settings; run the rest")
    gap: Optional[list] = _f(None, "[a, b]: also print arm a - arm b per N, paired by seed ([full, decoder_only])")


@dataclass
class FewshotConfig(DemoConfig):
    """``benchmarks/fewshot.py`` (the demo's blocks plus the grid)."""

    output_dir: str = _f("benchmarks/results", "folder of the summary files")
    stem: str = _f("fewshot_cpu", "file name stem of the summary files")
    work_dir: Optional[str] = _f(None, "per-run folders; null: a temporary folder, deleted afterwards")
    benchmark: FewshotGrid = _f(FewshotGrid, "the grid: n_train x seeds x arms")


@dataclass
class LrSweepConfig(DemoConfig):
    """``benchmarks/lr_sweep.py`` (the demo's blocks plus the grid)."""

    output_dir: str = _f("benchmarks/results", "folder of the summary files")
    stem: str = _f("lr_sweep_cpu", "file name stem of the summary files")
    work_dir: Optional[str] = _f(None, "per-run folders; null: <output_dir>/<stem>_runs")
    grid: Optional[Union[dict, str]] = _f(None, "{method: [lr, ...]} (or its JSON); null: the benchmark's grid")


@dataclass
class DiagnoseConfig:
    """``diagnose`` recipe."""

    output_dir: str = _f("runs/diagnose", "output folder")
    synthetic: bool = _f(False, "synthetic metadata instead of metadata / volumes files")
    n_per_group: int = _f(60, "synthetic subjects per diagnostic group")
    metadata: Optional[str] = _f(None, "CSV of subjects (id, group, age, sex, ...); required unless synthetic")
    volumes: Optional[str] = _f(None, "CSV of volumes (evaluate_run's volumes.csv); null: the metadata's volume_ml")
    seed: int = _f(0, "seed of the folds")
    features: list = _f(["volume_ml", "age", "sex"], "classifier features")
    tasks: list = _f([["CN", "AD"], ["EMCI", "LMCI"]], "pairs of groups to tell apart")
    folds: int = _f(5, "cross-validation folds")
    l2: float = _f(1.0, "L2 penalty of the logistic regression")


@dataclass
class EvaluateRunConfig:
    """``evaluate_run`` recipe."""

    run_dir: str = _f(REQUIRED, "folder of a finetune run (config.json, adapter/)")
    split: str = _f("test", "split to evaluate")
    output_dir: Optional[str] = _f(None, "null: <run_dir>/eval_<split>")
    merge: bool = _f(False, "merge the adapter into the weights first (PEFT arms that support merging)")
    progress: bool = _f(True, "show progress bars")
    data: Optional[dict] = _f(None, "null: the run's data; else a data block", rule="check_data")
    eval: EvalOverride = _f(EvalOverride, "evaluation settings (null: the run's)")


SCHEMAS = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "demo": DemoConfig, "diagnose": DiagnoseConfig,
           "evaluate_run": EvaluateRunConfig, "fewshot": FewshotConfig, "lr_sweep": LrSweepConfig}


def infer_schema(cfg: dict) -> str | None:
    """The recipe a config is for, from its top-level keys; None when it is no recipe's (a benchmark's own)."""
    keys = set(cfg)
    if "run_dir" in keys:
        return "evaluate_run"
    if {"arms", "pretrain", "finetune"} <= keys:
        return "fewshot" if "benchmark" in keys else "lr_sweep" if "grid" in keys else "demo"
    if keys & {"features", "folds"}:
        return "diagnose"
    if {"arm", "train"} <= keys:
        return "finetune"
    if {"data", "model", "train"} <= keys:
        return "pretrain"
    return None


# ---------------------------------------------------------------------------------------------------- checking
def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _suggest(key: str, cls, path: str) -> str:
    """``did you mean <path>.<nearest>?`` by the fields' aliases, then difflib; else the list of valid keys."""
    names = [f.name for f in dataclasses.fields(cls)]
    low = key.lower()
    for f in dataclasses.fields(cls):
        if low == f.name.lower() or low in f.metadata.get("aliases", ()):
            return f"did you mean {_join(path, f.name)}?"
    near = difflib.get_close_matches(low, names, n=1, cutoff=0.6)
    if not near:  # a prefix / substring (e.g. batch -> batch_size) before giving up
        near = [n for n in names if n.startswith(low) or low.startswith(n) and len(n) > 2][:1]
    if near:
        return f"did you mean {_join(path, near[0])}?"
    return f"valid keys: {', '.join(names)}"


def _check(value, tp, path: str):
    """``value`` checked against the annotation ``tp``; returns it (nested blocks filled, numbers normalised)."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(value, arg, path)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {_show(value)}")
    if dataclasses.is_dataclass(tp):
        return _fill(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    elif tp is dict:
        if isinstance(value, dict):
            return value
    else:  # pragma: no cover - an annotation this checker does not know
        raise TypeError(f"schema field {path} has an unsupported type {tp!r}")
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {_show(value)}")


def _fill(cls, data, path: str) -> dict:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__} {_show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise ConfigError(f"{_join(path, str(key))}: unknown key; {_suggest(str(key), cls, path)}")
    hints = _hints(cls)
    out = {}
    for key in list(data) + [k for k in fields if k not in data]:
        f, p = fields[key], _join(path, key)
        if key in data:
            value = _check(data[key], hints[key], p)
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if default is REQUIRED:
                raise ConfigError(f"{p}: required key missing ({f.metadata['help']})")
            value = _fill(type(default), {}, p) if dataclasses.is_dataclass(default) else copy.deepcopy(default)
        choices = f.metadata.get("choices")
        if choices and value is not None and str(value).lower() not in choices:
            raise ConfigError(f"{p}: {_show(value)} is not one of {', '.join(choices)}; set {p}=<one of them>")
        if choices and isinstance(value, str):
            value = value.lower()
        if f.metadata.get("rule") and value is not None:
            value = _RULES[f.metadata["rule"]](value, p)
        out[key] = value
    return out


def validate_config(cfg: dict, schema: str | type | None = "auto") -> dict:
    """``cfg`` checked against a recipe's schema (a name of :data:`SCHEMAS`, a schema class, ``"auto"``: inferred
    by :func:`infer_schema`, None: not checked) and returned with every default filled in (a new dict)."""
    if schema == "auto":
        schema = infer_schema(cfg) if isinstance(cfg, dict) else None
    if schema is None:
        return copy.deepcopy(cfg)
    cls = SCHEMAS[schema] if isinstance(schema, str) else schema
    return _fill(cls, copy.deepcopy(cfg), "")


def fill_block(cls, block: dict | None, path: str) -> dict:
    """One block (e.g. ``optim`` for :func:`~peft_tensor.training.loop.make_optimizer`) checked and filled."""
    return _fill(cls, copy.deepcopy(block), path)


def schema_keys(schema: str | type) -> dict:
    """``{block: [keys]}`` the schema checks (top-level keys under ``""``), for documentation and tests."""
    cls = SCHEMAS[schema] if isinstance(schema, str) else schema
    out: dict = {}

    def walk(c, path):
        hints = _hints(c)
        out[path] = [f.name for f in dataclasses.fields(c)]
        for f in dataclasses.fields(c):
            tp = hints[f.name]
            args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) is Union else [tp]
            if len(args) == 1 and dataclasses.is_dataclass(args[0]):
                walk(args[0], _join(path, f.name))
    walk(cls, "")
    return out


# ---------------------------------------------------------------------------------------------------- rules
def check_train(train: dict, path: str) -> dict:
    if not train.get("steps") and not train.get("epochs"):
        raise ConfigError(f"{path}: needs {path}.steps or {path}.epochs")
    return train


def _unknown(keys, valid, path: str, what: str) -> None:
    for key in keys:
        if key not in valid:
            near = difflib.get_close_matches(str(key), sorted(valid), n=1, cutoff=0.6)
            hint = f"did you mean {_join(path, near[0])}?" if near else f"valid keys: {', '.join(sorted(valid))}"
            raise ConfigError(f"{_join(path, str(key))}: unknown key for {what}; {hint}")


def check_device(device: str, path: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    import re

    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(device).lower()):
        raise ConfigError(f"{path}: {_show(device)} is not a device; set {path}=auto, cpu, cuda or cuda:N")
    return str(device).lower()


def check_threads(threads, path: str):
    """An int >= 1, ``auto`` (or null, checked by the type)."""
    if isinstance(threads, str) and threads.lower() != "auto" or isinstance(threads, int) and threads < 0:
        raise ConfigError(f"{path}: {_show(threads)} is not a thread count; set {path}=auto, null or a number")
    return threads


def _layout_keys(kind: str) -> tuple[set, dict] | None:
    """(keys, {key: annotation}) a built-in ``data.kind`` takes -- its loader function's arguments plus the task and
    settings keys every kind shares; None when it takes any key (``**kwargs``)."""
    import inspect

    from ..data.loaders import SETTINGS_KEYS, TASK_KEYS, resolve_loader

    loader = resolve_loader(kind)
    params = inspect.signature(loader).parameters
    keys = {"kind", *TASK_KEYS, *SETTINGS_KEYS, *(n for n, p in params.items() if p.kind is not p.VAR_KEYWORD)}
    if kind == "embedded":  # its **spec_kwargs are the cohort's CohortSpec fields
        from ..data.embedded import CohortSpec

        keys |= {f.name for f in dataclasses.fields(CohortSpec)}
    elif any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    try:
        hints = typing.get_type_hints(loader)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve: the types are not checked
        hints = {}
    simple = (int, float, bool, str, list, dict, type(None))
    checked = {}
    for name, hint in hints.items():
        args = typing.get_args(hint) if typing.get_origin(hint) is Union else (hint,)
        if name in keys and name != "return" and all(a in simple for a in args):
            checked[name] = hint
    return keys, checked


def _required_args(kind: str) -> list[str]:
    import inspect

    from ..data.loaders import resolve_loader

    return [n for n, p in inspect.signature(resolve_loader(kind)).parameters.items()
            if p.default is p.empty and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]


def _owners(kind: str, unknown: list) -> list[str]:
    """The other built-in layouts that take every key of ``unknown``."""
    from ..data.loaders import LOADERS

    return [k for k in LOADERS if k != kind and (_layout_keys(k) or (set(),))[0] >= set(unknown)]


def _wrong_kind(data: dict, kind: str, unknown: list, owners: list, valid: set, path: str) -> ConfigError:
    """Keys another layout takes, left in a block whose ``kind`` was changed (``data.kind=msd`` on a config written
    for the embedded cohort): the block must be replaced, not patched key by key."""
    given = {k: data[k] for k in _required_args(kind) if data.get(k) is not None}
    example = ", ".join([f"kind: {kind}"] + [f"{k}: {given.get(k, '...')}" for k in _required_args(kind)])
    return ConfigError(
        f"{path}: data.kind={kind} does not take {', '.join(unknown)} (keys of data.kind={owners[0]}): replace the "
        f"whole {path} block, not {path}.kind alone -- {path}='{{{example}}}' on the command line, or edit a copy "
        f"(peft-tensor copy <config> my.yaml); data.kind={kind} takes {', '.join(sorted(valid - {'kind'}))}")


def check_data(data: dict, path: str) -> dict:
    """A built-in layout takes its loader function's arguments plus the task and settings keys every kind shares
    (a key left null is ignored, as :func:`peft_tensor.data.load_dataset` does), with the types its function
    declares; ``data.preprocess`` and ``data.loader`` take their dataclasses' fields. A dotted-path loader's keys
    are its own. Keys of another layout (``data.kind`` changed alone) are refused with how to replace the block."""
    try:
        from ..data.datasets import LoaderSettings
        from ..data.loaders import LOADERS
        from ..data.transforms import Preprocess
    except ModuleNotFoundError:  # pragma: no cover - the recipes extra is not installed: nothing to check with
        return data
    kind = str(data.get("kind", "embedded"))
    layout = _layout_keys(kind) if kind in LOADERS else None
    if layout is not None:
        valid, hints = layout
        unknown = [str(k) for k, v in data.items() if v is not None and k not in valid]
        owners = _owners(kind, unknown) if unknown else []
        if owners and (len(unknown) > 1 or "kind" not in data or not difflib.get_close_matches(
                unknown[0], sorted(valid), n=1, cutoff=0.6)):
            raise _wrong_kind(data, kind, unknown, owners, valid, path)
        _unknown(unknown, valid, path, f"data.kind={kind}")
        for key, hint in hints.items():
            if data.get(key) is not None:
                data[key] = _check(data[key], hint, _join(path, key))
    for reader in (Preprocess.from_config, LoaderSettings.from_config):
        try:
            reader(data)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
    return data


def check_model(model: dict, path: str) -> dict:
    """A backbone by ``name``: a known name and valid sizes (:func:`~peft_tensor.training.models.model_kwargs`). A
    ``_target_`` class's arguments are checked when the network is built (under the loaders' allow-list)."""
    if "_target_" in model:
        return model
    from .models import model_kwargs

    try:
        model_kwargs(model)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return model


_ARM_KEYS = {"name", "label", "decoder", "lr", "method_lr", "method_weight_decay", "modules_to_save"}


def check_arm(arm, path: str):
    """A known arm name. For an arm of a registered method: the arm's own keys (``label``, ``decoder``, ``lr``,
    ``method_lr``, ``modules_to_save``) and its config class's fields. A PEFT LoRA arm's fields are checked by
    ``LoraConfig`` when the arm is applied; full / decoder_only / frozen ignore any other key (a ``base:`` config's
    PEFT fields stay in the merged arm)."""
    from .arms import FULL_SUFFIX, canonical_arm

    if isinstance(arm, str):
        arm = {"name": arm}
    if not isinstance(arm, dict):
        raise ConfigError(f"{path}: expected an arm name or a mapping, got {type(arm).__name__} {_show(arm)}")
    if "name" not in arm:
        raise ConfigError(f"{path}.name: required key missing (the arm: see `peft-tensor list`)")
    try:
        name = canonical_arm(arm["name"])
    except ValueError as exc:
        raise ConfigError(f"{path}.name: {exc}") from None
    if name in ("full", "decoder_only", "frozen"):  # they ignore PEFT fields (left over from a base: config)
        return arm
    from ..registry import methods

    spec = methods().get(name.removesuffix(FULL_SUFFIX))
    if spec is not None and dataclasses.is_dataclass(spec.config_cls):
        fields = {f.name for f in dataclasses.fields(spec.config_cls)}
        _unknown(arm, _ARM_KEYS | fields, path, f"arm {name}")
    return arm


def check_arms(arms: list, path: str) -> list:
    for i, arm in enumerate(arms):
        check_arm(arm, f"{path}[{i}]")
    return arms


_RULES = {"check_data": check_data, "check_model": check_model, "check_arm": check_arm, "check_arms": check_arms,
          "check_train": check_train, "check_device": check_device, "check_threads": check_threads}
