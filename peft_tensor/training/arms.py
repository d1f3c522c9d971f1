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
at the method's registry learning rate (``method_lr``, see :func:`optimizer_settings`), the decoder at ``optim.lr``.
An arm of one of our methods takes its config class,
default fields and target modules per backbone from the method's registry entry
(:func:`peft_tensor.registry.register`), so a new method is an arm without any change here.
"""

from __future__ import annotations

import torch

from ..registry import methods
from .models import HEAD, build_model, defaults_for

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
    :func:`~peft_tensor.training.models.defaults_for`), the 1x1x1 head excluded, in module order. Read from the
    backbone built on the meta device (no memory, no weights). ``transposed=False`` leaves out ConvTranspose layers
    (PEFT LoRA cannot adapt them)."""
    if decoder == "head":
        raise ValueError("a _full arm adapts the decoder's convolutions; decoder: head would leave none. Use "
                         "decoder: paper (default) or wide.")
    d = defaults_for(model_cfg, decoder)
    blocks = [m for m in d["decoder"] if m not in HEAD]
    kinds = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    if transposed:
        kinds += (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
    from accelerate import init_empty_weights  # parameters on meta; SwinUNETR's constructor .item()s a tensor

    with init_empty_weights():
        model = build_model(dict(model_cfg))
    return [n for n, m in model.named_modules() if isinstance(m, kinds) and name_matches(n, blocks)]


def peft_config(arm: str, arm_cfg: dict, model_cfg: dict):
    """The PEFT config object of a PEFT arm (fields from ``arm_cfg``; targets / decoder default per backbone)."""
    arm = canonical_arm(arm)
    full = arm.endswith(FULL_SUFFIX)
    method = arm[: -len(FULL_SUFFIX)] if full else arm
    decoder = dict(arm_cfg).get("decoder", "paper")
    d = defaults_for(model_cfg, "paper" if full else decoder)
    kw = {k: v for k, v in dict(arm_cfg).items() if k not in _RESERVED}
    kw.setdefault("modules_to_save", list(HEAD if full else d["decoder"]))
    spec = methods().get(method)
    convs = decoder_conv_targets(model_cfg, decoder, transposed=spec is not None) if full else []
    if spec is not None:
        kw.setdefault("target_modules", list(spec.targets.get(d["backbone"]) or d["target_modules"]) + convs)
        defaults = spec.arm_defaults if not full or spec.full_arm_defaults is None else spec.full_arm_defaults
        return spec.config_cls(**{**defaults, **kw})
    kw.setdefault("target_modules", list(d["target_modules"]) + convs)
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


def apply_arm(model: torch.nn.Module, arm_cfg: dict | str, model_cfg: dict) -> torch.nn.Module:
    """Return the model prepared for ``arm_cfg["name"]``: a ``PeftModel`` for PEFT arms, ``model`` itself with the
    right ``requires_grad`` flags otherwise."""
    if isinstance(arm_cfg, str):
        arm_cfg = {"name": arm_cfg}
    arm = canonical_arm(arm_cfg.get("name", "full"))
    d = defaults_for(model_cfg, arm_cfg.get("decoder", "paper"))
    if arm == "full":
        model.requires_grad_(True)
        return model
    if arm == "decoder_only":
        set_trainable(model, arm_cfg.get("modules_to_save", d["decoder"]))
        return model
    if arm == "frozen":
        set_trainable(model, arm_cfg.get("modules_to_save", HEAD))
        return model
    from peft import get_peft_model

    return get_peft_model(model, peft_config(arm, arm_cfg, model_cfg))


def optimizer_settings(arm_cfg: dict) -> dict:
    """The arm's learning rates, laid over the recipe's ``optim`` section: ``lr`` / ``method_lr`` from the arm's
    config, else ``method_lr`` = the ``lr`` of the method's registry entry (the learning rate of its trainable
    factors; the decoder and head keep ``optim.lr``; ``full_lr`` for a ``<method>_full`` arm), else nothing; and
    ``method_weight_decay`` from the arm's config, else the registry entry's ``weight_decay`` (if it has one)."""
    out = {k: arm_cfg[k] for k in ("lr", "method_lr", "method_weight_decay") if k in arm_cfg}
    arm = canonical_arm(arm_cfg.get("name", "full"))
    full = arm.endswith(FULL_SUFFIX)
    spec = methods().get(arm[: -len(FULL_SUFFIX)] if full else arm)
    lr = None if spec is None else spec.full_lr if full and spec.full_lr is not None else spec.lr
    if "method_lr" not in out and lr is not None:
        out["method_lr"] = lr
    if "method_weight_decay" not in out and spec is not None and spec.weight_decay is not None:
        out["method_weight_decay"] = spec.weight_decay
    return out


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
