"""The method registry: one :func:`register` call per method, in its folder's ``__init__.py``.

Everything that needs to know which methods exist reads this registry instead of a list of its own:

* PEFT: :func:`register` adds the ``PeftType`` member and PEFT's config / tuner / prefix mappings
  (:mod:`peft_tensor._registration`);
* loading: :data:`KNOWN_PROVIDERS` (``peft_type`` -> distribution) names the package to install for an adapter
  whose method is not registered;
* the recipes' arms (``arm.name=<method>``): config class, default fields, target modules per backbone, the
  learning rate of the method's trainable factors (and :data:`BASELINE_LR`, that of PEFT LoRA's and PiSSA's
  adapters, swept the same way);
* the benchmarks (which arms are ours and checked against the efficiency targets) and ``peft-tensor list``.

Adding a method is one new folder ``peft_tensor/tuners/<method>/`` whose ``__init__.py`` ends with a
``register(...)`` call, plus one import line in ``peft_tensor/__init__.py``; see CONTRIBUTING.md.

This module is library code: it imports neither the recipes nor the training code.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any, Mapping, Optional

from ._registration import register_method

__all__ = ["BASELINE_LR", "DECODER_RATE_FACTOR", "KNOWN_PROVIDERS", "MethodSpec", "SWINUNETR_TARGETS",
           "UNETR_TARGETS", "baseline_lr", "get_method", "methods", "register"]

# The Linear layers of MONAI's networks that the papers adapt (module-name suffixes, PEFT's ``target_modules``).
UNETR_TARGETS = ("attn.qkv", "attn.out_proj", "mlp.linear1", "mlp.linear2")
SWINUNETR_TARGETS = ("attn.qkv", "attn.proj", "mlp.linear1", "mlp.linear2", "downsample.reduction")
DEFAULT_TARGETS = MappingProxyType({"unetr": UNETR_TARGETS, "swinunetr": SWINUNETR_TARGETS})

# The learning rate of PEFT's own baselines' adapter matrices (lora_A / lora_B) in the recipes' arms ``lora`` (r=8)
# and ``pissa`` (r=2), from the same adapter-only sweep as our methods' ``lr`` (the decoder and head keep optim.lr),
# the best test Dice of each on a fresh demo backbone (LoRA 0.278 at 0.03; PiSSA 0.303 at 0.3, 0.283 at 0.1, 0.182
# at 1.0; one seed):
#   python benchmarks/lr_sweep.py progress=false threads=1 stem=lr_sweep_baselines_cpu \
#       'grid={"lora": [0.003, 0.01, 0.03, 0.1], "pissa": [0.001, 0.003, 0.01, 0.03, 0.1], "frozen": [null],
#              "tcurlora": [0.3], "lorapt": [0.3], "hyps": [0.1]}'      (then 'grid={"pissa": [0.3, 1.0]}')
# -> benchmarks/results/lr_sweep_baselines_cpu.{jsonl,md} (docs/methods.md, "Learning rates").
BASELINE_LR: Mapping[str, float] = MappingProxyType({"lora": 0.03, "pissa": 0.3})

# With the decoder training as well (every arm but ``decoder: head`` and the whole-network ``_full`` arms), the
# recipes train an adapter's factors at this fraction of its adapter-alone rate (the registry's ``lr`` / ``lr_by``,
# :data:`BASELINE_LR`). At the adapter-alone rates every adapter ends 0.02-0.06 Dice below decoder-only; at a tenth
# each is within 0.01 of decoder-only's Dice (LoRA-PT on one backbone 0.024 below), for tCURLoRA, LoRA-PT, HyPS and
# PEFT LoRA on the learning panel's three backbones (shifted task, seeds 0 and 1); PiSSA gains too on the shifted
# few-shot grid (0.613 at 0.03 against 0.601 at 0.3; decoder-only 0.653) (docs/methods.md, "Learning rates"):
#   python benchmarks/learning_panel.py stem=learning_panel_cpu_decoder 'tasks=[target_shift]' 'seeds=[0, 1]' ...
#   python benchmarks/fewshot.py --config fewshot_shift_cpu stem=fewshot_shift_cpu_decoder_rates ...
DECODER_RATE_FACTOR = 0.1

# peft_type -> distribution that provides it; filled by register(). A foreign method may be added by hand.
KNOWN_PROVIDERS: dict[str, str] = {}

_METHODS: dict[str, "MethodSpec"] = {}


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """What the rest of the package needs to know about one method.

    Attributes:
        name: lower-case name, used as the arm name in recipe configs (``arm.name=tcurlora``).
        peft_type: the ``PeftType`` member name written to ``adapter_config.json`` (``"TCURLORA"``).
        config_cls: the ``PeftConfig`` subclass.
        model_cls: the ``BaseTuner`` subclass; its parameters start with ``prefix``.
        prefix: parameter-name prefix of the method's trainable tensors (``"tcurlora_"``).
        summary: one line for ``peft-tensor list`` and the docs.
        paper: where the method is defined.
        arm_defaults: config fields a recipe arm uses unless its config sets them (e.g. ``{"r": 8}``).
        full_arm_defaults: the same for the whole-network arm ``<name>_full`` (adapter on the encoder's Linears and
            the decoder's convolutions); ``None``: ``arm_defaults``. A rank that suits 768-wide Linears may exceed
            the channel count of a decoder's convolutions.
        backbone_arm_defaults: config fields laid over ``arm_defaults`` for one backbone (the preset's name:
            ``unetr``, ``swinunetr``, ...), ``{backbone: {field: value}}``, when the arm takes the preset's targets
            (no ``target_modules`` of its own; not the whole-network arm). E.g. ``{"unetr": {"grouping": "paper"}}``:
            a setting that needs the backbone's own layout.
        targets: ``target_modules`` per backbone name (``unetr``, ``swinunetr``); backbones not named here use
            :data:`DEFAULT_TARGETS`.
        lr: learning rate of the method's trainable factors in the recipes (``method_lr``; the decoder and head
            keep ``optim.lr``); ``None``: the recipe's ``optim.lr`` for everything.
        full_lr: the same for the whole-network arm ``<name>_full``; ``None``: ``lr``.
        lr_by: learning rates of arms whose config sets a field to a given value, ``{field: {value: lr}}``, in place
            of ``lr`` (not for the whole-network arm). The field's value is the arm config's, else ``arm_defaults``'.
            E.g. ``{"basis": {"paper": 0.3}}``: when the recipes' default coordinates need another rate than the
            paper's, an arm that asks for the paper's gets the paper's rate, not the default's.
        weight_decay: weight decay of the method's trainable factors in the recipes (``method_weight_decay``);
            ``None``: the recipe's ``optim.weight_decay``. Adam's weight decay is an L2 pull towards zero, which means
            something for weights but not for factors whose zero is not the identity (docs/methods.md#weight-decay).
        provider: the distribution that ships the method (named in load errors).
    """

    name: str
    peft_type: str
    config_cls: type
    model_cls: type
    prefix: str
    summary: str = ""
    paper: str = ""
    arm_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    full_arm_defaults: Optional[Mapping[str, Any]] = None
    targets: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    lr: Optional[float] = None
    full_lr: Optional[float] = None
    weight_decay: Optional[float] = None
    provider: str = "peft-tensor"
    lr_by: Mapping[str, Mapping[Any, float]] = dataclasses.field(default_factory=dict)
    backbone_arm_defaults: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

    def defaults_for(self, backbone: str | None = None, full: bool = False) -> dict[str, Any]:
        """The config fields a recipe arm of this method uses unless its config sets them: ``arm_defaults``
        (``full_arm_defaults`` for the whole-network arm), with ``backbone_arm_defaults[backbone]`` over them for an
        arm on that backbone that takes the preset's targets (``backbone=None``: an arm with its own targets)."""
        if full:
            return dict(self.arm_defaults if self.full_arm_defaults is None else self.full_arm_defaults)
        extra = self.backbone_arm_defaults.get(str(backbone).lower(), {}) if backbone else {}
        return {**self.arm_defaults, **extra}

    def lr_for(self, arm_cfg: Mapping[str, Any], full: bool = False) -> Optional[float]:
        """The recipes' learning rate of this method's factors for an arm config (``lr_by``, ``lr``, ``full_lr``)."""
        if full:
            return self.full_lr if self.full_lr is not None else self.lr
        for key, table in self.lr_by.items():
            value = arm_cfg.get(key, self.arm_defaults.get(key))
            if isinstance(value, (str, int, float, bool)) and value in table:
                return table[value]
        return self.lr

    def targets_for(self, backbone: str) -> list[str]:
        """``target_modules`` for a backbone name (``"unetr"``, ``"swinunetr"``)."""
        key = str(backbone).lower()
        found = self.targets.get(key) or DEFAULT_TARGETS.get(key)
        if found is None:
            raise ValueError(f"{self.name}: no target modules known for backbone {backbone!r}; pass target_modules")
        return list(found)


def register(name: str, *, peft_type: str, config_cls: type, model_cls: type, prefix: str, summary: str = "",
             paper: str = "", arm_defaults: Mapping[str, Any] | None = None,
             full_arm_defaults: Mapping[str, Any] | None = None,
             targets: Mapping[str, tuple[str, ...] | list[str]] | None = None, lr: float | None = None,
             full_lr: float | None = None, weight_decay: float | None = None,
             provider: str = "peft-tensor", lr_by: Mapping[str, Mapping[Any, float]] | None = None,
             backbone_arm_defaults: Mapping[str, Mapping[str, Any]] | None = None) -> MethodSpec:
    """Register a method with PEFT and with this registry (idempotent: a reload replaces the entry)."""
    if getattr(model_cls, "prefix", prefix) != prefix:
        raise ValueError(f"{model_cls.__name__}.prefix is {model_cls.prefix!r}, registered as {prefix!r}")
    spec = MethodSpec(name=name, peft_type=peft_type, config_cls=config_cls, model_cls=model_cls, prefix=prefix,
                      summary=summary, paper=paper, arm_defaults=MappingProxyType(dict(arm_defaults or {})),
                      full_arm_defaults=(None if full_arm_defaults is None
                                         else MappingProxyType(dict(full_arm_defaults))),
                      targets=MappingProxyType({k: tuple(v) for k, v in (targets or {}).items()}), lr=lr,
                      full_lr=full_lr, weight_decay=weight_decay, provider=provider,
                      lr_by=MappingProxyType({k: MappingProxyType(dict(v)) for k, v in (lr_by or {}).items()}),
                      backbone_arm_defaults=MappingProxyType({str(k).lower(): MappingProxyType(dict(v))
                                                              for k, v in (backbone_arm_defaults or {}).items()}))
    register_method(peft_type, config_cls, model_cls, prefix=prefix)
    _METHODS[name] = spec
    KNOWN_PROVIDERS[peft_type] = provider
    return spec


def methods() -> Mapping[str, MethodSpec]:
    """The registered methods by name, in registration order (read-only view)."""
    return MappingProxyType(_METHODS)


def get_method(name: str) -> MethodSpec:
    """The registered method ``name`` (arm name, e.g. ``"tcurlora"``, or its ``peft_type``, e.g. ``"TCURLORA"``)."""
    key = str(name)
    if key in _METHODS:
        return _METHODS[key]
    for spec in _METHODS.values():
        if spec.peft_type == key.upper():
            return spec
    raise KeyError(f"no registered method {name!r}; registered: {', '.join(_METHODS) or 'none'}")


def baseline_lr(arm: str) -> Optional[float]:
    """The swept learning rate of a PEFT baseline arm's adapter (``"lora"``, ``"pissa"``), else None."""
    return BASELINE_LR.get(str(arm))
