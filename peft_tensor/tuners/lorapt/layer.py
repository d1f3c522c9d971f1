from __future__ import annotations

import torch
from torch import nn

from ...algebra import from_fourier, to_fourier, truncated_t_svd
from ..tensor_group import TensorGroup, TensorGroupLayer


class LoraPTGroup(TensorGroup):
    """One group tensor's LoRA-PT state.

    Trainable: ``lorapt_U (L, n1, r)``, ``lorapt_S`` (``(L, r, r)``, or ``(L, r)`` for an f-diagonal core),
    ``lorapt_V (L, n2, r)``. Frozen and saved: their initial values ``*_init``, which define ``P0``. ``D = U * S * V^T
    - U0 * S0 * V0^T`` is applied as two t-products of thin factors, the second one frozen.
    """

    param_names = ("lorapt_U", "lorapt_S", "lorapt_V")
    differentiable_factors = ((True, True), (False, False))  # U * (S * V^T), then the frozen U0 * -(S0 * V0^T)

    @staticmethod
    def expected_shapes(spec, config) -> dict[str, tuple[int, ...]]:
        L, r = spec.n_slices, config.r
        core = (L, r) if config.core == "diagonal" else (L, r, r)
        shapes = {"lorapt_U": (L, spec.n1, r), "lorapt_S": core, "lorapt_V": (L, spec.n2, r)}
        shapes.update({f"{k}_init": v for k, v in list(shapes.items())})
        return shapes

    def _configure(self, config) -> None:
        self.diagonal = config.core == "diagonal"

    def _init_from_weight(self, weight: torch.Tensor, config) -> None:
        svd = truncated_t_svd(weight, self.rank, method=config.svd_method)
        s = torch.diagonal(svd.S, dim1=-2, dim2=-1) if self.diagonal else svd.S
        for name, value in (("U", svd.U), ("S", s), ("V", svd.V)):
            value = value.contiguous()
            self.register_buffer(f"lorapt_{name}_init", value.clone())
            if not config.init_weights:
                value = value + 0.1 * value.abs().mean() * torch.randn_like(value)
            setattr(self, f"lorapt_{name}", nn.Parameter(value.clone()))

    def _core_times_vt(self, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s_hat = to_fourier(torch.diag_embed(s) if self.diagonal else s)
        return from_fourier(s_hat @ to_fourier(v).mH, self.n_slices)  # S * V^T : (L, r, n2)

    def factors(self):
        g = self._core_times_vt(self.lorapt_S.float(), self.lorapt_V.float())
        return [(self.lorapt_U.float(), g), (self.lorapt_U_init.float(), self._minus_g0())]

    def _minus_g0(self) -> torch.Tensor:
        """``-(S0 * V0^T)``: frozen, so computed once and kept until the initial factors change (load, device move)."""
        key = tuple((t._version, t.data_ptr()) for t in (self.lorapt_S_init, self.lorapt_V_init))
        hit = self.__dict__.get("_g0")
        if hit is None or hit[0] != key:
            with torch.no_grad():
                hit = (key, -self._core_times_vt(self.lorapt_S_init.float(), self.lorapt_V_init.float()))
            self.__dict__["_g0"] = hit
        return hit[1]


class LoraPTLayer(TensorGroupLayer):
    """An nn.Linear adapted by LoRA-PT."""


__all__ = ["LoraPTGroup", "LoraPTLayer"]
