from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

from ..._peft_compat import ensure_peft_type
from ...errors import PeftTensorError
from .._config import GroupingConfigMixin, PeftTensorConfigMixin


@dataclass
class LoraPTConfig(GroupingConfigMixin, PeftTensorConfigMixin, PeftConfig):
    """LoRA-PT (arXiv 2407.11292): principal tensor singular components of stacked weights train.

    Per group tensor ``W = U * S * V^T`` (t-SVD): the principal part ``P = U_r * S_r * V_r^T`` (tubal rank ``r``)
    trains, the residual stays frozen; the base weights are never touched: ``W'_k = W_k + [P - P0]_k`` with ``P0``
    the frozen initial principal part (stored as its factors, so loading needs no new SVD). Exactly ``W`` at init;
    mergeable. Trainable per group: ``L * (r * (n1 + n2) + r^2)`` with ``core="full"`` (``L * r`` for the core with
    ``core="diagonal"``); UNETR-B, paper grouping: 165,960 (r=1) ... 1,331,712 (r=8).
    """

    r: int = field(default=8, metadata={"help": "Tubal rank of the trainable principal part."})
    core: str = field(
        default="full",
        metadata={"help": "'full': the core S is a trainable r x r x L tensor; 'diagonal': f-diagonal, r x L."},
    )
    svd_method: str = field(
        default="auto",
        metadata={"help": "How the truncated t-SVD is computed at init: 'full' (LAPACK SVD of every Fourier slice), "
                  "'eigh' (exact top-r triplets from each slice's Gram matrix, float64 Rayleigh-Ritz: agrees with "
                  "'full' to ~1e-6, several times faster), 'randomized' (two power iterations: fastest, but far from "
                  "the principal subspace on flat spectra such as freshly initialised weights) or 'auto' ('eigh' "
                  "when r is small relative to the slices, else 'full'). The result is saved with the adapter."},
    )

    factor_scale: Optional[Union[str, float]] = field(
        default=None,
        metadata={"help": "Scale of the factors' updates: the adapter uses U0 + a (U - U0), V0 + a (V - V0) and "
                  "S0 + a_S (S - S0). 'auto' (default for new adapters): a = c / sigma_1 and a_S = c, sigma_1 the "
                  "largest tubal singular value of the group's principal part and c = 0.2, so each factor reaches "
                  "the weights with gain at most c (unscaled, a step on U or V is amplified by sigma_1^2, and plain "
                  "SGD at PEFT's test lr 0.5 diverges where LoRA r=8 does not; see LoraPTGroup.AUTO_GAIN); the "
                  "columns of U and V that belong to smaller singular values reach the weights with gain "
                  "c * sigma_i / sigma_1 only. 'per_component': a is one number per principal component, "
                  "a_i = c / sigma_i (sigma_i: the component's largest Fourier-slice singular value, floored at "
                  "sigma_1 / 100), so every column of U and V reaches the weights with gain c; a_S = c. 1.0: the "
                  "paper's unscaled form; a positive number: a = a_S = that number. Configs written before this "
                  "field existed load as 1.0."},
    )

    core_gain: float = field(
        default=1.0,
        metadata={"help": "Multiplies the core's update scale: the adapter uses S0 + core_gain * a_S (S - S0), with "
                  "a_S from factor_scale. Below 1 the core S moves less per optimiser step than the factors U and V, "
                  "whose updates change the principal subspaces. 1.0 (the default, and what configs written before "
                  "this field load as): a_S as factor_scale sets it. The recipes' LoRA-PT arm uses 0.2 (the "
                  "registry's arm_defaults; evidence in docs/methods.md#lora-pts-recipe-form)."},
    )

    frozen_term: str = field(
        default="factored",
        metadata={"help": "How the frozen initial part P0 = U0 * S0 * V0^T of D = P - P0 is applied. 'factored' "
                  "(default): a second t-product of thin factors next to the trainable one (no weight-sized tensor; "
                  "the identity at init is bit-exact). 'dense': each targeted Linear runs x (W - P0_k)^T plus the "
                  "trainable term, with W - P0 built once from the base weight and the saved initial factors (no "
                  "decomposition; never saved; rebuilt when the base weight or the factors change: load, device "
                  "move, cast, merge) and held, so the frozen term costs nothing per step: use it for faster training "
                  "steps where memory allows (timings: docs/internals.md). Costs one weight-sized copy of the "
                  "targeted weights (as PEFT PiSSA's residual, but the base weights stay "
                  "untouched, so disable_adapter() is the base model); equal to 'factored' up to float rounding "
                  "(the identity at init is not bit-exact)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ensure_peft_type("LORAPT")
        # before _check_common fills in peft_tensor_version
        self._resolve_scale("factor_scale", ("auto", "per_component"))
        self._check_common()
        self._check_grouping()
        gain = self.core_gain
        try:
            ok = not isinstance(gain, bool) and math.isfinite(float(gain)) and float(gain) > 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise PeftTensorError(f"core_gain must be a positive number (1.0: the core moves as factor_scale sets), "
                                  f"got {gain!r}.")
        self.core_gain = float(gain)
        if self.core not in ("full", "diagonal"):
            raise PeftTensorError(f"core must be 'full' or 'diagonal', got {self.core!r}.")
        if self.frozen_term not in ("factored", "dense"):
            raise PeftTensorError(f"frozen_term must be 'factored' or 'dense', got {self.frozen_term!r}.")
        if self.svd_method not in ("auto", "full", "eigh", "randomized"):
            raise PeftTensorError(
                f"svd_method must be 'auto', 'full', 'eigh' or 'randomized', got {self.svd_method!r}."
            )
