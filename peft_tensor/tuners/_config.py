"""Fields and checks shared by every peft_tensor config."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Union

from packaging.version import InvalidVersion, Version

from ..errors import AdapterLoadError, PeftTensorError
from ..version import __version__
from ._ranks import method_name


@dataclass
class PeftTensorConfigMixin:
    """Mixed into every peft_tensor ``PeftConfig`` subclass (before ``PeftConfig`` in the bases)."""

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Names (suffix match) or a regex (full match) of the modules to adapt: nn.Linear and, for "
            "every method (tCURLoRA, LoRA-PT, HyPS), convolutions (Conv1d/2d/3d, ConvTranspose1d/2d/3d, groups=1). "
            "None (default): the network's preset, filled in by get_peft_model (peft_tensor.preset_for: UNETR, "
            "SwinUNETR v1/v2, ViT, ViTAutoEnc, SegResNet, UNet, DynUNet, BasicUNet, AttentionUnet), e.g. "
            "['attn.qkv', 'attn.out_proj', 'mlp.linear1', 'mlp.linear2'] for UNETR. A list that covers only part of "
            "a known network's preset warns."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Names or a regex of modules to leave alone even if target_modules match."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "Modules trained in full and saved with the adapter, e.g. the UNETR decoder and head as in the "
            "papers. Use dotted names ('out.conv.conv'), a bare 'out' also matches dropout modules."
        },
    )
    rank_pattern: Optional[dict] = field(
        default_factory=dict,
        metadata={
            "help": "Per-layer ranks, PEFT LoRA's rank_pattern: module name (suffix) or regex -> rank, overriding r "
            "where a key matches (e.g. {'encoder1.layer.conv1.conv': 1} or {'^vit\\\\.blocks\\\\.0\\\\..*': 4}). "
            "tCURLoRA and LoRA-PT stack several layers into one tensor with one rank: every layer of a group must "
            "resolve to the same rank (docs/methods.md, per-layer ranks)."
        },
    )
    rank_cap: Optional[bool] = field(
        default=None,
        metadata={
            "help": "True: a rank above what a group (tCURLoRA, LoRA-PT: min(n1, n2) of its slices) or a layer "
            "(HyPS: min(out, in) of its matrix) allows is lowered to that bound, with one warning naming every "
            "capped group and its new rank (whole-network targets: a 1-channel input convolution allows r=1). "
            "False or None: such a rank is refused with a RankError."
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: the adapter is an exact identity at initialisation. False: trainable factors are "
            "perturbed at random (for tests that must see a non-trivial adapter)."
        },
    )
    peft_tensor_version: Optional[str] = field(
        default=None, metadata={"help": "Version of peft_tensor that wrote this config; filled in automatically."}
    )

    def _resolve_scale(self, name: str, modes: tuple[str, ...] = ("auto",)) -> None:
        """A scale field: ``None`` (a config file written before the field existed: ``1.0``, the unscaled form it was
        trained with; a new config: ``'auto'``), one of ``modes`` or a positive number (strings from YAML parsed)."""
        value = getattr(self, name)
        if value is None:
            value = 1.0 if self.peft_tensor_version is not None else "auto"
        if isinstance(value, str) and value not in modes:
            try:
                value = float(value)
            except ValueError:
                value = None
        if value is None or (not isinstance(value, str) and not float(value) > 0):
            named = " or ".join(repr(m) for m in modes)
            raise PeftTensorError(f"{name} must be {named} or a positive number, got {getattr(self, name)!r}.")
        setattr(self, name, value)

    def _check_common(self) -> None:
        if self.peft_tensor_version is None:
            self.peft_tensor_version = __version__
        else:
            try:
                written, installed = Version(str(self.peft_tensor_version)), Version(__version__)
            except InvalidVersion as exc:
                raise AdapterLoadError(
                    f"adapter_config.json has an invalid peft_tensor_version {self.peft_tensor_version!r}."
                ) from exc
            if written > installed:
                raise AdapterLoadError(
                    f"This adapter was written by peft_tensor {written}, newer than the installed {installed}. "
                    f"Upgrade with `pip install -U 'peft-tensor>={written}'`."
                )
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = list(self.target_modules)
        if self.target_modules is not None and not self.target_modules:
            raise PeftTensorError(
                f"{method_name(self)} target_modules={self.target_modules!r} names no module: pass None for the "
                "network's preset (peft_tensor.preset_for) or the names of the layers to adapt."
            )
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise PeftTensorError(f"r must be a positive integer, got {self.r!r}.")
        self._check_rank_pattern()

    def _check_rank_pattern(self) -> None:
        pattern = {} if self.rank_pattern is None else self.rank_pattern
        example = "e.g. rank_pattern={'encoder1.layer.conv1.conv': 1}"
        if not isinstance(pattern, dict):
            raise PeftTensorError(f"rank_pattern must be a dict of module name or regex -> rank ({example}), got "
                                  f"{type(pattern).__name__}.")
        for key, rank in pattern.items():
            if not isinstance(key, str) or not key:
                raise PeftTensorError(f"rank_pattern keys must be module names or regexes ({example}), got {key!r}.")
            try:
                re.compile(key)
            except re.error as exc:
                raise PeftTensorError(f"rank_pattern key {key!r} is not a valid regex ({exc}): escape it, e.g. "
                                      f"{re.escape(key)!r}.") from exc
            if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
                raise PeftTensorError(f"rank_pattern[{key!r}] must be a positive integer rank, got {rank!r}.")
        self.rank_pattern = dict(pattern)
        if self.rank_cap is not None and not isinstance(self.rank_cap, bool):
            raise PeftTensorError(f"rank_cap must be True, False or None, got {self.rank_cap!r}.")


@dataclass
class GroupingConfigMixin:
    """Fields of the cross-layer tensor methods (tCURLoRA, LoRA-PT): how weights are stacked into tensors."""

    grouping: str = field(
        default="by_shape",
        metadata={"help": "'by_shape' (same-shape weights stacked in module order; any model) or 'paper' "
                  "(UNETR-style blocks: attention tensor from out_proj/q/k/v, MLP-up and MLP-down tensors)."},
    )
    slice_order: list[str] = field(
        default_factory=lambda: ["out_proj", "q", "k", "v"],
        metadata={"help": "Order of the 4 slices each block contributes to the attention tensor under "
                  "grouping='paper' (the authors use out_proj, q, k, v)."},
    )
    conv_layout: str = field(
        default="kernel",
        metadata={"help": "How a convolution's kernel (Conv1d/2d/3d, ConvTranspose1d/2d/3d targets) becomes slices. "
                  "'kernel' (default): one group per layer whose K = prod(kernel_size) slices are the kernel "
                  "positions, each an out x in matrix (in x out for a transposed convolution): tCURLoRA trains "
                  "r^2 K numbers per layer whatever its width. 'stacked': the kernel flattened to out x (in K) is one "
                  "slice, and same-shape kernels of several layers are stacked like Linear weights (by_shape). "
                  "A 1x1x1 kernel is one out x in slice in both, grouped with the Linear weights of its shape."},
    )
    delta_mode: str = field(
        default="factored",
        metadata={"help": "How the update D reaches a layer's output; all three compute the same function. "
                  "'factored' (default): D_k x through thin t-product factors, no weight-sized tensor (cost grows "
                  "with tokens x L x r). 'dense': D materialised once per forward through the FFT, the layer runs "
                  "x (W_k + D_k)^T; it holds one weight-sized D per group and pays a weight-sized gradient, so use it "
                  "on a GPU at large token counts, not on CPU (timings: docs/internals.md, docs/results.md). "
                  "'auto': dense on CUDA where a flop count says it is cheaper, factored on CPU."},
    )

    def _check_grouping(self) -> None:
        if self.grouping not in ("by_shape", "paper"):
            raise PeftTensorError(f"grouping must be 'by_shape' or 'paper', got {self.grouping!r}.")
        if self.conv_layout not in ("kernel", "stacked"):
            raise PeftTensorError(f"conv_layout must be 'kernel' or 'stacked', got {self.conv_layout!r}.")
        if self.delta_mode not in ("auto", "factored", "dense"):
            raise PeftTensorError(f"delta_mode must be 'auto', 'factored' or 'dense', got {self.delta_mode!r}.")
        self.slice_order = list(self.slice_order)
