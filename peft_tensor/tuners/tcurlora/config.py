from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig

from ..._registration import ensure_peft_type
from ...errors import PeftTensorError
from .._config import PeftTensorConfigMixin
from ..grouping import DEFAULT_SLICE_ORDER


@dataclass
class TCURLoraConfig(PeftTensorConfigMixin, PeftConfig):
    """tCURLoRA (arXiv 2501.02227): tensor CUR of stacked weights, only the small core ``U`` trains.

    Per group tensor ``W`` (slices ``W_k``): ``W'_k = W_k + [C * (U - U0) * R]_k`` with ``C``/``R`` the selected
    columns/rows of ``W`` (deterministic, by summed Fourier-slice norms) and ``U0`` the slice-wise pseudo-inverse
    of their intersection. Exactly ``W`` at init, no scaling factor, mergeable. Trainable: ``r * r * L`` per group
    (4,608 for UNETR-B with ``r=8`` and the paper grouping).

    Example::

        config = TCURLoraConfig(r=8, target_modules=["attn.qkv", "attn.out_proj", "mlp.linear1", "mlp.linear2"],
                                grouping="paper", modules_to_save=["decoder2", "out.conv.conv"])
    """

    r: int = field(default=8, metadata={"help": "CUR rank: columns and rows kept per group (paper default 8)."})
    grouping: str = field(
        default="by_shape",
        metadata={"help": "'by_shape' (same-shape weights stacked in module order; any model) or 'paper' "
                  "(UNETR-style blocks: attention tensor from out_proj/q/k/v, MLP-up and MLP-down tensors)."},
    )
    slice_order: list[str] = field(
        default_factory=lambda: list(DEFAULT_SLICE_ORDER),
        metadata={"help": "Order of the 4 slices each block contributes to the attention tensor under "
                  "grouping='paper' (the authors use out_proj, q, k, v)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ensure_peft_type("TCURLORA")
        self._check_common()
        if self.grouping not in ("by_shape", "paper"):
            raise PeftTensorError(f"grouping must be 'by_shape' or 'paper', got {self.grouping!r}.")
        self.slice_order = list(self.slice_order)
