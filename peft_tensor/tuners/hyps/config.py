"""Configuration of HyPS (hybrid parallel + serial adapters, arXiv 2409.00884)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from peft.config import PeftConfig

from ..._peft_compat import ensure_peft_type
from ...errors import PeftTensorError
from .._config import PeftTensorConfigMixin

__all__ = ["HyPSConfig", "SWINUNETR_HYPS_TARGETS"]

#: The paper's target set on MONAI SwinUNETR: every nn.Linear of the Swin encoder (36 layers for depths 2,2,2,2).
#: Use the dotted "attn.proj": a bare "proj" also matches (and, since HyPS adapts convolutions, adapts) the
#: patch-embedding Conv3d ``swinViT.patch_embed.proj``.
SWINUNETR_HYPS_TARGETS = ["attn.qkv", "attn.proj", "mlp.linear1", "mlp.linear2", "downsample.reduction"]


@dataclass
class HyPSConfig(PeftTensorConfigMixin, PeftConfig):
    """Configuration of a [`HyPSModel`].

    Every targeted ``nn.Linear`` (weight ``W``, out x in) or convolution (below) gets two branches:

    - parallel (PiSSA on the layer's own SVD): ``A = U_r S_r^(1/2)`` (out x r) and ``B = S_r^(1/2) V_r^T`` (r x in) are
      trainable, their initial values ``A0, B0`` are frozen buffers saved with the adapter, and the layer computes
      ``h = (W + A B - A0 B0) x + b``. The base weight is never modified; the branch is mergeable.
    - serial (bottleneck adapter on the layer output): ``y = h + scale * Up(ReLU(Down(h)))`` with ``Down`` (out -> d,
      Kaiming-uniform with rows mirrored in pairs ``(w, -w)``, so that no ReLU bottleneck is dead at init) and ``Up``
      (d -> out, zeros). Non-linear in ``x``: it cannot be merged.

    Convolutions (``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``, ``groups=1``; our extension, not in the paper)
    get the same two branches. The parallel branch factorises the kernel as the matrix ``W.reshape(W.shape[0], -1)``:
    ``out x in*prod(k)`` for a convolution, ``in x out*prod(k)`` for a transposed one (its weight is stored in x out
    x k). That is the im2col matrix the convolution itself multiplies with, so a ``1x1x1`` convolution is exactly the
    Linear case, the update runs as an ``r``-kernel convolution plus a ``1x1x1`` mix (no dense kernel per step) and
    the count ``r (rows + cols)`` equals PEFT LoRA's for Conv3d. The serial branch acts on the output channels with
    ``1x1x1`` ``Down``/``Up`` convolutions (``2 d out`` parameters).

    Both branches are an exact identity at initialisation. Paper defaults: ``r=2, d=2, scale=1/d`` on
    [`SWINUNETR_HYPS_TARGETS`], with the SwinUNETR decoder and head trained in full (``modules_to_save=["decoder1",
    "decoder2", "decoder3", "decoder4", "decoder5", "out.conv.conv"]``).
    """

    r: int = field(
        default=2,
        metadata={
            "help": "Rank of the parallel (principal SVD) branch: the top-r singular triplets of each targeted weight "
            "become the trainable factors A (out x r) and B (r x in). Must not exceed min(in, out) of any target."
        },
    )
    d: int = field(
        default=2,
        metadata={"help": "Bottleneck width of the serial branch: Down maps out -> d, Up maps d -> out."},
    )
    scale: Optional[float] = field(
        default=None,
        metadata={"help": "Multiplier of the serial branch output, y = h + scale * Up(ReLU(Down(h))). "
                  "None means 1/d."},
    )
    dropout: float = field(
        default=0.0,
        metadata={
            "help": "Dropout probability applied to the input of each adapter branch (x for the parallel branch, h "
            "for the serial branch) during training. The base path never sees dropout."
        },
    )
    parallel: bool = field(
        default=True,
        metadata={"help": "Enable the parallel PiSSA branch (mergeable). parallel=True, serial=False is PiSSA-like."},
    )
    serial: bool = field(
        default=True,
        metadata={
            "help": "Enable the serial bottleneck branch (not mergeable). Set serial=False for a mergeable adapter."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ensure_peft_type("HYPS")
        self._check_common()
        if not (self.parallel or self.serial):
            raise PeftTensorError(
                "HyPSConfig has both branches switched off (parallel=False, serial=False), so it would adapt nothing. "
                "Enable at least one of them."
            )
        if isinstance(self.d, bool) or not isinstance(self.d, int) or self.d <= 0:
            raise PeftTensorError(f"d (serial bottleneck width) must be a positive integer, got {self.d!r}.")
        if self.scale is not None:
            if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(
                self.scale
            ):
                raise PeftTensorError(f"scale must be a finite number or None (meaning 1/d), got {self.scale!r}.")
            self.scale = float(self.scale)
        valid_p = isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool)
        if not valid_p or not 0.0 <= self.dropout < 1.0:
            raise PeftTensorError(f"dropout must be a probability in [0, 1), got {self.dropout!r}.")
        self.dropout = float(self.dropout)

    @property
    def serial_scale(self) -> float:
        """The effective serial multiplier: ``scale`` or, when unset, ``1 / d``."""
        return self.scale if self.scale is not None else 1.0 / self.d
