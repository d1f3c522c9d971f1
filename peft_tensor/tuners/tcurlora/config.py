from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig

from ..._registration import ensure_peft_type
from .._config import GroupingConfigMixin, PeftTensorConfigMixin


@dataclass
class TCURLoraConfig(GroupingConfigMixin, PeftTensorConfigMixin, PeftConfig):
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

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ensure_peft_type("TCURLORA")
        self._check_common()
        self._check_grouping()
