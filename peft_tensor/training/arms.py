"""Fine-tuning arms by name: which parameters train, and through which PEFT method.

=============  =====================================================================================
arm            what trains
=============  =====================================================================================
<method>       every method of :mod:`peft_tensor.registry` (tcurlora, lorapt, hyps): its adapter on the encoder
               Linears + decoder and head (``modules_to_save``)
<method>_full  the whole network through the adapter: the method on the encoder Linears *and* on every
               convolution of the decoder (Conv3d and ConvTranspose3d); only the 1x1x1 head trains in full
lora           PEFT LoRA + decoder and head
lora_full      PEFT LoRA (r=1) on the encoder Linears and the decoder's Conv3d layers (PEFT LoRA has no
               ConvTranspose3d: those stay frozen) + the head: the reference for the ``_full`` arms
pissa          PEFT LoRA with PiSSA initialisation + decoder and head
full           every parameter
decoder_only   decoder and head; the encoder is frozen (what the authors' public scripts measure)
frozen         only the 1x1x1 output head: no encoder and no decoder weight changes (a linear probe)
=============  =====================================================================================

The decoder trains in every PEFT arm, as in the papers. Which modules that is, is the arm option ``decoder``:
``paper`` (default; UNETR decoder2-5 + head, SwinUNETR decoder1-5 + head), ``wide`` (also the convolutional skip
encoders encoder1-4 / encoder10, what the recipes trained before) or ``head`` (the output head only: the adapter
alone), e.g. ``{name: tcurlora, decoder: head}``; an explicit ``modules_to_save`` wins. In a ``_full`` arm
the ``decoder`` option names the modules whose convolutions are adapted (``paper`` or ``wide``), and the head
trains. The adapter's factors train
at the method's registry learning rate (``method_lr``, see :func:`optimizer_settings`: the adapter-alone rate, a
tenth of it when the decoder trains too), the decoder at ``optim.lr``.
An arm of one of our methods takes its config class,
default fields and target modules per backbone from the method's registry entry
(:func:`peft_tensor.registry.register`), so a new method is an arm without any change here.
"""

from __future__ import annotations

import logging

import torch

from ..registry import methods
from .models import DECODER_SETS, build_model, defaults_for

logger = logging.getLogger(__name__)

PEFT_BASELINES = ("lora", "pissa")  # PEFT's own LoRA, plain and with PiSSA initialisation
FULL_SUFFIX = "_full"
# whole-network arms: every registered method's, and PEFT LoRA's as their reference
FULL_ARMS = tuple(f"{m}{FULL_SUFFIX}" for m in (*methods(), "lora"))
PEFT_ARMS = (*methods(), *PEFT_BASELINES, *FULL_ARMS)
ARMS = (*PEFT_ARMS, "full", "decoder_only", "frozen")
_ALIASES = {"decoder-only": "decoder_only", "decoder": "decoder_only", "linear": "decoder_only", "head": "frozen",
            "tcur": "tcurlora", "lora-pt": "lorapt", "lora_pt": "lorapt", "peft_lora": "lora", "peft_pissa": "pissa"}
_RESERVED = {"name", "lr", "method_lr", "method_weight_decay", "label", "decoder"}


def canonical_arm(name: str) -> str:
    key = str(name).lower().replace(" ", "_")
    key = _ALIASES.get(key, key)
    if key not in ARMS:
        raise ValueError(f"unknown arm {name!r}; choose one of {', '.join(ARMS)}")
    return key


def name_matches(name: str, patterns) -> bool:
    """Whether a parameter / module name lies in one of the modules named by ``patterns`` (dotted suffixes)."""
    return any(name == p or name.endswith("." + p) or name.startswith(p + ".") or f".{p}." in f".{name}."
               for p in patterns)


def set_trainable(model: torch.nn.Module, patterns) -> None:
    """Exactly the parameters inside the modules named by ``patterns`` train."""
    for pname, param in model.named_parameters():
        param.requires_grad_(name_matches(pname, patterns))


def decoder_conv_targets(model_cfg: dict, decoder: str = "paper", transposed: bool = True) -> list[str]:
    """Full names of the convolutions inside the backbone's decoder set (``paper`` or ``wide``, see
    :func:`~peft_tensor.training.models.defaults_for`), the output head (the ``head`` set) excluded, in module order.
    Read from the backbone built on the meta device (no memory, no weights). ``transposed=False`` leaves out
    ConvTranspose layers (PEFT LoRA cannot adapt them). A CNN's preset already targets its convolutions and its
    decoder set is its head: none."""
    if decoder == "head":
        raise ValueError("a _full arm adapts the decoder's convolutions; decoder: head would leave none. Use "
                         "decoder: paper (default) or wide.")
    d = defaults_for(model_cfg, decoder)
    head = defaults_for(model_cfg, "head")["decoder"]
    blocks = [m for m in d["decoder"] if m not in head]
    if not blocks:
        return []
    kinds = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    if transposed:
        kinds += (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
    from accelerate import init_empty_weights  # parameters on meta; SwinUNETR's constructor .item()s a tensor

    with init_empty_weights():
        model = build_model(dict(model_cfg))
    return [n for n, m in model.named_modules() if isinstance(m, kinds) and name_matches(n, blocks)]


def peft_config(arm: str, arm_cfg: dict, model_cfg: dict):
    """The PEFT config object of a PEFT arm. The arm's own fields come first (``target_modules``,
    ``modules_to_save``, the method's options); the network's preset (:func:`~.models.defaults_for`) fills only what
    is missing. An arm of one of our methods without ``target_modules`` leaves them to the tuner, which takes the
    preset (``target_modules=None``): that works for any network with a preset, CNNs included; a ``_full`` arm names
    the preset's targets plus the decoder's convolutions."""
    arm = canonical_arm(arm)
    full = arm.endswith(FULL_SUFFIX)
    method = arm[: -len(FULL_SUFFIX)] if full else arm
    decoder = dict(arm_cfg).get("decoder", "paper")
    kw = {k: v for k, v in dict(arm_cfg).items() if k not in _RESERVED}
    spec = methods().get(method)
    own_targets = "target_modules" in kw
    # our methods' tuners take the preset themselves when target_modules is missing, and refuse a network without
    # one naming layers that fit the rank: only PEFT's LoRA needs the preset's list here
    preset = _Preset(model_cfg, arm, need_targets=spec is None and not own_targets)
    if "modules_to_save" not in kw:
        kw["modules_to_save"] = preset.get("head" if full else decoder)["decoder"]
    if "target_modules" not in kw:
        own = spec.targets.get(preset.get("paper")["backbone"]) if spec is not None and spec.targets else None
        if full or own or spec is None:  # a list to name; PEFT's LoRA has no MONAI presets
            convs = decoder_conv_targets(model_cfg, decoder, transposed=spec is not None) if full else []
            kw["target_modules"] = list(own or preset.get("paper")["target_modules"]) + convs
    if spec is not None:
        # the backbone's own defaults (registry's backbone_arm_defaults) only with the preset's targets
        backbone = None if full or own_targets or not spec.backbone_arm_defaults else preset.backbone()
        return spec.config_cls(**{**spec.defaults_for(backbone, full), **kw})
    from peft import LoraConfig

    if full:
        kw.setdefault("r", 1)  # the smallest LoRA: closest to the tensor methods' whole-network budgets
        kw.setdefault("lora_alpha", 2 * kw["r"])
    elif arm == "pissa":
        kw.setdefault("r", 2)
        kw.setdefault("lora_alpha", kw["r"])
        kw.setdefault("init_lora_weights", "pissa")
    else:
        kw.setdefault("r", 8)
        kw.setdefault("lora_alpha", 2 * kw["r"])
    kw.setdefault("lora_dropout", 0.0)
    return LoraConfig(**kw)


class _Preset:
    """The network's preset per decoder set, read on first use only. A network without a preset fine-tunes with the
    arm's own ``target_modules`` (then only the adapter trains unless ``modules_to_save`` says more); only an arm that
    needs the preset's targets here (PEFT's LoRA without ``target_modules``) is refused."""

    def __init__(self, model_cfg: dict, arm: str, need_targets: bool):
        self.model_cfg, self.arm, self.need_targets, self._sets = model_cfg, arm, need_targets, {}

    def backbone(self) -> str:
        """The preset's backbone name (``""`` without a preset), from a decoder set already read if there is one."""
        return next(iter(self._sets.values()))["backbone"] if self._sets else self.get("paper")["backbone"]

    def get(self, decoder: str) -> dict:
        if decoder not in self._sets:
            try:
                self._sets[decoder] = defaults_for(self.model_cfg, decoder)
            except ValueError as exc:
                if self.need_targets or decoder not in DECODER_SETS:
                    raise ValueError(f"arm {self.arm}: {exc} In a recipe config that is arm.target_modules.") from None
                logger.warning("%s has no preset: only the adapter trains; set arm.modules_to_save to train more",
                               dict(self.model_cfg).get("_target_", dict(self.model_cfg).get("name")))
                self._sets[decoder] = {"target_modules": [], "decoder": [], "backbone": ""}
        return self._sets[decoder]


def apply_arm(model: torch.nn.Module, arm_cfg: dict | str, model_cfg: dict) -> torch.nn.Module:
    """Return the model prepared for ``arm_cfg["name"]``: a ``PeftModel`` for PEFT arms, ``model`` itself with the
    right ``requires_grad`` flags otherwise."""
    if isinstance(arm_cfg, str):
        arm_cfg = {"name": arm_cfg}
    arm = canonical_arm(arm_cfg.get("name", "full"))
    if arm == "full":
        model.requires_grad_(True)
        return model
    if arm in ("decoder_only", "frozen"):
        if "modules_to_save" in arm_cfg:
            set_trainable(model, arm_cfg["modules_to_save"])
        else:
            decoder = arm_cfg.get("decoder", "paper") if arm == "decoder_only" else "head"
            set_trainable(model, defaults_for(model_cfg, decoder)["decoder"])
        return model
    from peft import get_peft_model

    return get_peft_model(model, peft_config(arm, arm_cfg, model_cfg))


def optimizer_settings(arm_cfg: dict) -> dict:
    """The arm's learning rates, laid over the recipe's ``optim`` section: ``lr`` / ``method_lr`` from the arm's
    config, else ``method_lr`` = the ``lr`` of the method's registry entry (the learning rate of its trainable
    factors; the decoder and head keep ``optim.lr``; ``full_lr`` for a ``<method>_full`` arm; ``lr_by`` for an arm
    whose config picks another form, e.g. ``basis: paper``) or, for PEFT's
    ``lora`` and ``pissa``, their swept rate (:data:`peft_tensor.registry.BASELINE_LR`), else nothing -- these are
    the adapter-alone rates: an arm that trains the decoder too (:func:`trains_decoder`; not a ``_full`` arm) gets
    :data:`peft_tensor.registry.DECODER_RATE_FACTOR` times that; and ``method_weight_decay`` from the arm's config,
    else the registry entry's ``weight_decay`` (if it has one)."""
    from ..registry import baseline_lr

    out = {k: arm_cfg[k] for k in ("lr", "method_lr", "method_weight_decay") if k in arm_cfg}
    arm = canonical_arm(arm_cfg.get("name", "full"))
    full = arm.endswith(FULL_SUFFIX)
    spec = methods().get(arm[: -len(FULL_SUFFIX)] if full else arm)
    lr = baseline_lr(arm) if spec is None else spec.lr_for(arm_cfg, full)
    factor = decoder_rate_factor(arm_cfg)
    if lr is not None and factor != 1.0:
        lr = float(f"{lr * factor:.12g}")  # 0.3 -> 0.03, not 0.030000000000000002
    if "method_lr" not in out and lr is not None:
        out["method_lr"] = lr
    if "method_weight_decay" not in out and spec is not None and spec.weight_decay is not None:
        out["method_weight_decay"] = spec.weight_decay
    return out


def trains_decoder(arm_cfg: dict) -> bool:
    """Whether an adapter arm trains the decoder as well as its adapter: every ``decoder`` option but ``head`` (the
    adapter alone), and an explicit ``modules_to_save``."""
    if arm_cfg.get("modules_to_save") is not None:
        return True
    return str(arm_cfg.get("decoder", "paper")) != "head"


def decoder_rate_factor(arm_cfg: dict) -> float:
    """The factor on the registry's adapter-alone rate of an arm: :data:`peft_tensor.registry.DECODER_RATE_FACTOR`
    for an arm that trains the decoder too (:func:`trains_decoder`), 1.0 for the adapter alone and the ``_full``
    arms (their own ``full_lr``)."""
    from ..registry import DECODER_RATE_FACTOR

    if canonical_arm(arm_cfg.get("name", "full")).endswith(FULL_SUFFIX) or not trains_decoder(arm_cfg):
        return 1.0
    return DECODER_RATE_FACTOR


def arm_rates(arm_cfg: dict | str, optim_cfg: dict | None = None) -> dict:
    """The learning rates an arm trains at: ``{"lr": ..., "method_lr": ...}`` -- ``method_lr`` that of the adapter's
    parameters (None: one rate for every trainable parameter), ``lr`` that of the rest (decoder and head), from the
    recipe's ``optim`` block with :func:`optimizer_settings` laid over it, as the recipes' optimiser gets them."""
    from .schema import OptimConfig, fill_block

    if isinstance(arm_cfg, str):
        arm_cfg = {"name": arm_cfg}
    optim = fill_block(OptimConfig, {**dict(optim_cfg or {}), **optimizer_settings(arm_cfg)}, "optim")
    return {"lr": float(optim["lr"]), "method_lr": None if optim["method_lr"] is None else float(optim["method_lr"])}


def format_rates(rates: dict | None) -> str:
    """An arm's rates for a table: ``"0.03 / 0.003"`` (adapter / decoder and head) or ``"0.003"`` (one rate for
    every trainable parameter); ``"?"`` when not recorded."""
    if not rates or rates.get("lr") is None:
        return "?"
    if rates.get("method_lr") is None:
        return f"{rates['lr']:g}"
    return f"{rates['method_lr']:g} / {rates['lr']:g}"


def param_counts(model: torch.nn.Module) -> dict:
    """Trainable and total parameter counts (tuner-level shared parameters included)."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return {"trainable": trainable, "total": total}


def save_trained(model: torch.nn.Module, folder, arm: str, card_text: str | None = None) -> None:
    """PEFT arms: ``save_pretrained`` (adapter + config + card). Other arms: the trainable weights as
    ``trainable.safetensors``. ``card_text`` is appended to the adapter card (``README.md``)."""
    from pathlib import Path

    from safetensors.torch import save_file

    from .._atomic import atomic_write, atomic_write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if canonical_arm(arm) in PEFT_ARMS and hasattr(model, "save_pretrained"):
        from ..hub.publish import save_peft_files

        save_peft_files(model, folder)  # through a temporary folder: never writes through a planted symlink
    else:
        state = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
        atomic_write(folder / "trainable.safetensors", lambda tmp: save_file(state, tmp))
    if card_text:
        card = folder / "README.md"
        text = card.read_text() if card.is_file() else ""
        atomic_write_text(card, text + ("\n" if text else "") + card_text)


def load_trained(base_model: torch.nn.Module, folder, arm: str) -> torch.nn.Module:
    """Inverse of :func:`save_trained`: the fine-tuned model from its pretrained base and the saved folder."""
    from pathlib import Path

    folder = Path(folder)
    if canonical_arm(arm) in PEFT_ARMS:
        if canonical_arm(arm) in (*PEFT_BASELINES, "lora_full"):
            from peft import PeftModel

            return PeftModel.from_pretrained(base_model, str(folder))
        from peft_tensor import from_pretrained

        return from_pretrained(base_model, str(folder))
    from safetensors.torch import load_file

    state = load_file(str(folder / "trainable.safetensors"))
    missing = set(state) - set(dict(base_model.named_parameters()))
    if missing:
        raise ValueError(f"{folder} holds weights the base model lacks: {sorted(missing)[:5]}")
    base_model.load_state_dict(state, strict=False)
    return base_model
