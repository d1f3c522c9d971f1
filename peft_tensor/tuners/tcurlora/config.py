from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

from ..._peft_compat import ensure_peft_type
from ...errors import PeftTensorError
from .._config import GroupingConfigMixin, PeftTensorConfigMixin

DEFAULT_BASIS = "paper"  # of a new config (basis=None); a config file without the field is 'paper' too


@dataclass
class TCURLoraConfig(GroupingConfigMixin, PeftTensorConfigMixin, PeftConfig):
    """tCURLoRA (arXiv 2501.02227): tensor CUR of stacked weights, only the small core ``U`` trains.

    Per group tensor ``W`` (slices ``W_k``): ``W'_k = W_k + [C * (U - U0) * R]_k`` with ``C``/``R`` the selected
    columns/rows of ``W`` (deterministic, by summed Fourier-slice norms) and ``U0`` the slice-wise pseudo-inverse
    of their intersection. Exactly ``W`` at init, mergeable. Trainable: ``r * r * L`` per group (4,608 for UNETR-B
    with ``r=8`` and the paper grouping).

    Scale (``core_scale``): the update is ``s * C * (U - U0) * R``. The paper has no scale (``core_scale=1.0``
    reproduces it); then a step on ``U`` moves the weights by an amount set by ``|C| |R|``, i.e. by the square of the
    weights' size, so one learning rate cannot suit both the core and the decoder (docs/methods.md).
    ``core_scale="auto"`` (default) sets ``s = rms(C, R) * sqrt(L n1 n2) / g`` with
    ``g^2 = sum_f |C^_f|_F^2 |R^_f|_F^2`` over the Fourier slices: a core step whose entries all have size ``lr``
    (what Adam takes) changes the adapted weights by about ``lr`` times their rms, in any layer and at any weight
    scale (``W -> cW`` leaves the relative step unchanged). ``s`` is recomputed from ``C`` and ``R`` (columns/rows
    of the base weights), so nothing is added to the adapter file.

    Example::

        config = TCURLoraConfig(r=8, target_modules=["attn.qkv", "attn.out_proj", "mlp.linear1", "mlp.linear2"],
                                grouping="paper", modules_to_save=["decoder2", "out.conv.conv"])
    """

    r: int = field(default=8, metadata={"help": "CUR rank: columns and rows kept per group (paper default 8)."})
    core_scale: Optional[Union[str, float]] = field(
        default=None,
        metadata={"help": "Scale s of the update s * C * (U - U0) * R. 'auto' (default for new adapters): a core step "
                  "of size lr moves the weights by about lr times their rms (see the class docstring); 1.0: the "
                  "paper's unscaled form; any positive number: that s. Configs written before this field existed "
                  "load as 1.0, which is how they were trained."},
    )

    basis: Optional[str] = field(
        default=None,
        metadata={"help": "Coordinates of the trainable core. 'paper' (default): the paper's core U, initialised at "
                  "the pseudo-inverse U0 of the intersection. 'orthonormal': the update is "
                  "s * Q_C * U' * Q_R^T with Q_C, Q_R the orthonormalised C and R (per Fourier slice, QR) and U' "
                  "zero at init; the same update as the paper's with U - U0 = T_C^-1 U' T_R^-1 (T the triangular "
                  "QR factors, saved with the adapter, so loading runs no decomposition), but a step on U' moves "
                  "the weights equally in every direction, and weight decay pulls U' towards the identity "
                  "(docs/methods.md#tcurlora-core-coordinates). A step of a given size moves the weights less in "
                  "these coordinates, so they train at a larger rate: the recipes use 'orthonormal' at r=16 with "
                  "Adam at 2.0 on the core, 'paper' at 0.3 (docs/methods.md#tcurloras-recipe-form). Configs written "
                  "before this field existed load as 'paper', which is how they were trained."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ensure_peft_type("TCURLORA")
        if self.basis is None:  # before _check_common fills in peft_tensor_version
            self.basis = "paper" if self.peft_tensor_version is not None else DEFAULT_BASIS
        if self.basis not in ("orthonormal", "paper"):
            raise PeftTensorError(f"basis must be 'orthonormal' or 'paper', got {self.basis!r}.")
        self._resolve_scale("core_scale")  # before _check_common fills in peft_tensor_version
        self._check_common()
        self._check_grouping()
