from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from ...algebra import compute_dtype, fourier_slice_weights, from_fourier, t_qr_whiteners, tensor_cur, to_fourier
from .._group_state import replaying_forward
from ..tensor_group import TensorGroup, TensorGroupLayer, cache_build


class TCURLoraGroup(TensorGroup):
    """One group tensor's tCURLoRA state.

    Saved (persistent): ``tcurlora_core`` U ``(L, r, r)`` trainable; ``tcurlora_core_init`` U0 ``(L, r, r)``;
    ``col_idx``/``row_idx`` ``(r,)``, the selected columns/rows. ``C`` and ``R`` are exact copies of base-weight
    columns/rows, so they are re-gathered from the base weights by index rather than stored (the adapter file stays
    tiny and no decomposition is re-run at load). ``R`` is kept in the Fourier domain, where it is used.

    ``basis="orthonormal"`` (``TCURLoraConfig.basis``) also saves ``col_whiten`` / ``row_whiten`` ``(L, r, r)``, the
    inverse triangular QR factors of C and R (``C * col_whiten`` and ``row_whiten * R`` are t-orthonormal), and the
    core starts at zero: ``D = s C * col_whiten * (U - U_init) * row_whiten * R``, ``U_init = 0``.
    """

    param_names = ("tcurlora_core",)
    index_names = ("col_idx", "row_idx")
    optional_names = ("base_fingerprint",)  # files written before it existed load without the base check
    differentiable_factors = ((False, True),)  # C is frozen, (U - U0) * R trains

    # C and R follow the base weights (re-gathered when a base weight is replaced or edited in place: a checkpoint
    # restored into the wrapped layers), so what runs in memory is what a save and a load give. ``base_fingerprint``
    # (saved) records the columns/rows they were taken from: FINGERPRINT_PROBES random-sign projections of C and of R
    # (64 bytes per group), float64 stored bit-for-bit as int64 (no dtype cast touches it). A load onto base weights
    # whose projections differ by more than FINGERPRINT_RTOL (relative; bfloat16 rounding of the same weights is ~2e-3)
    # warns: the adapter then computes another update than the one saved.
    FINGERPRINT_PROBES = 4
    FINGERPRINT_RTOL = 5e-3

    @staticmethod
    def expected_shapes(spec, config) -> dict[str, tuple[int, ...]]:
        L, r = spec.n_slices, (spec.rank if spec.rank is not None else config.r)
        shapes = {"tcurlora_core": (L, r, r), "tcurlora_core_init": (L, r, r), "col_idx": (r,), "row_idx": (r,)}
        if getattr(config, "basis", "paper") == "orthonormal":
            shapes.update(col_whiten=(L, r, r), row_whiten=(L, r, r))
        return shapes

    def _init_from_weight(self, weight: torch.Tensor, config) -> None:
        cur = tensor_cur(weight, self.rank)
        self.register_buffer("col_idx", cur.col_idx.clone())
        self.register_buffer("row_idx", cur.row_idx.clone())
        if self.basis == "orthonormal":
            # U - U0 = Wc * U' * Wr with U' trainable from zero: the same updates, isometric coordinates
            wc, wr = t_qr_whiteners(cur.C, cur.R)
            self.register_buffer("col_whiten", wc.to(cur.U.dtype))
            self.register_buffer("row_whiten", wr.to(cur.U.dtype))
            self.register_buffer("tcurlora_core_init", torch.zeros_like(cur.U))
            core = torch.zeros_like(cur.U)
            if not config.init_weights:  # a unit core entry moves the weights by about their rms (core_scale auto)
                core = 0.1 * torch.randn_like(core)
        else:
            self.register_buffer("tcurlora_core_init", cur.U.clone())
            core = cur.U.clone()
            if not config.init_weights:
                core = core + 0.1 * core.abs().mean() * torch.randn_like(core)
        self.tcurlora_core = nn.Parameter(core)
        self._set_frozen(cur.C, cur.R)

    def _init_empty(self, spec, config, device) -> None:
        super()._init_empty(spec, config, device)
        self.register_buffer("base_fingerprint", torch.zeros(2, self.FINGERPRINT_PROBES, dtype=torch.int64,
                                                             device=device))

    def _set_frozen(self, c: torch.Tensor, r: torch.Tensor) -> None:
        # Real buffers only: Module.to(dtype) would cast a complex buffer to a real dtype and drop its imaginary part.
        self.register_buffer("cols", c.contiguous(), persistent=False)  # C (L, n1, r)
        self.register_buffer("rows", r.contiguous(), persistent=False)  # R (L, r, n2)
        self.register_buffer("base_fingerprint", self._fingerprint(c, r).view(torch.int64))
        self.__dict__["_frozen_key"] = self._base_key()
        self.__dict__.pop("_rows_hat_cache", None)
        self.__dict__.pop("_scale_cache", None)

    def _fingerprint(self, c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """``(2, probes)`` float64: fixed random-sign projections of C and of R (all slices)."""
        g = torch.Generator().manual_seed(20250101)
        k = self.FINGERPRINT_PROBES

        def project(t: torch.Tensor) -> torch.Tensor:
            # sum_x t[x] * sign[p, x] with sign = 2 * bit - 1: 2 * (bits @ t) - sum(t). The same signs (the same draws
            # of the generator) as before, without a float64 sign tensor the size of C; float32 sums, far inside
            # FINGERPRINT_RTOL. uint8 draws the same bits as the default int64, at half the cost
            bits = torch.randint(0, 2, (k, t.numel()), generator=g, dtype=torch.uint8).to(t.device, torch.float32)
            flat = t.detach().reshape(-1).float()
            return 2 * (bits @ flat).double() - flat.double().sum()

        with torch.no_grad():
            fc, fr = project(c), project(r)
        return torch.stack([fc, fr], dim=0).contiguous()

    def _base_key(self) -> tuple:
        """Identity and version of every base weight C and R are taken from (an in-place edit or a replaced tensor
        changes it; merge/unmerge write through ``.data`` and leave the unmerged weights, hence C and R, as they
        were)."""
        seen, key = set(), []
        for layer, _, _ in self._sources:
            if id(layer) not in seen:
                seen.add(id(layer))
                w = layer.get_base_layer().weight
                key.append((w.data_ptr(), w._version, w.device, w.dtype))
        return tuple(key)

    def _sync_frozen(self) -> None:
        """Re-gather C and R when a base weight changed since they were taken (see ``FINGERPRINT_PROBES``)."""
        if "cols" not in self._buffers or replaying_forward():  # a backward recomputes from the forward's C, R
            return
        key = self._base_key()
        if self.__dict__.get("_frozen_key") != key:
            self.__dict__["_frozen_key"] = key  # first: the unmerged weights of a merged adapter use these factors
            self.refresh_frozen()

    def refresh_frozen(self) -> None:
        with torch.no_grad():
            w = self.stacked_weight().to(self.tcurlora_core.device)
            c = w[:, :, self.col_idx.long()]
            r = w[:, self.row_idx.long(), :]
            self._set_frozen(c.to(self.tcurlora_core.dtype), r.to(self.tcurlora_core.dtype))

    def _after_load(self, state_dict, prefix: str, received: set) -> None:
        saved = state_dict.get(prefix + "base_fingerprint")
        if saved is None:
            return  # a file from before the fingerprint: nothing to compare with
        saved = saved.to(torch.int64).view(torch.float64).to(self.base_fingerprint.device)
        current = self.base_fingerprint.view(torch.float64)
        if saved.shape != current.shape:
            return
        scale = float(saved.norm())
        rel = float((current - saved).norm()) / scale if scale > 0 else float((current - saved).norm())
        if rel > self.FINGERPRINT_RTOL:
            warnings.warn(
                f"tCURLoRA group {self.name!r}: the base weights this adapter is loaded onto are not the ones it was "
                f"saved with (relative difference {rel:.3g} in the columns/rows C and R the adapter takes from them). "
                "Its update C * (U - U0) * R is rebuilt from these weights, so the outputs differ from the saved "
                "adapter's. Load it onto the base model it was trained (and saved) on.",
                UserWarning, stacklevel=2)

    def combined_extras(self) -> dict:
        """Saved tensors a combination of this group with others (same C and R) copies as they are."""
        extras = {"base_fingerprint": self.base_fingerprint.clone()}
        if self.basis == "orthonormal":
            extras.update(col_whiten=self.col_whiten.clone(), row_whiten=self.row_whiten.clone())
        return extras

    def _rows_hat(self) -> torch.Tensor:
        """R (``basis='orthonormal'``: ``row_whiten * R``) in the Fourier domain ``(L//2+1, r, n2)``, complex; cached
        off the module while R (and the whitener) is unchanged."""
        rows = self.rows
        white = self.row_whiten if self.basis == "orthonormal" else None
        key = (rows.data_ptr(), rows._version, rows.dtype, rows.device) + (
            () if white is None else (white.data_ptr(), white._version, white.dtype))
        hit = self.__dict__.get("_rows_hat_cache")
        if hit is None or hit[0] != key:
            with cache_build():
                r_hat = to_fourier(rows)  # float32, or float64 for a float64 model
                if white is not None:
                    r_hat = to_fourier(white.to(rows.dtype)) @ r_hat
                hit = (key, r_hat)
            self.__dict__["_rows_hat_cache"] = hit
        return hit[1]

    def _configure(self, config) -> None:
        super()._configure(config)
        self.core_scale = getattr(config, "core_scale", 1.0)
        self.basis = getattr(config, "basis", None) or "paper"

    def scale(self) -> float:
        """``s`` of ``s * C * (U - U0) * R`` (see ``TCURLoraConfig.core_scale``); 'auto' is computed from C and R
        (frozen) and cached while they are unchanged."""
        if self.core_scale != "auto":
            return float(self.core_scale)
        self._sync_frozen()
        cols, rows = self.cols, self.rows
        key = (cols.data_ptr(), cols._version, rows.data_ptr(), rows._version, cols.device)
        if self.basis == "orthonormal":
            key += tuple((t.data_ptr(), t._version) for t in (self.col_whiten, self.row_whiten))
        hit = self.__dict__.get("_scale_cache")
        if hit is None or hit[0] != key:
            with torch.no_grad():
                c, r = cols.double(), rows.double()
                w = fourier_slice_weights(self.n_slices, device=c.device, dtype=c.dtype)
                c_hat, r_hat = to_fourier(c), to_fourier(r)
                if self.basis == "orthonormal":  # the factors the core multiplies: Q_C and Q_R^T
                    c_hat = c_hat @ to_fourier(self.col_whiten.double())
                    r_hat = to_fourier(self.row_whiten.double()) @ r_hat
                gain2 = (w * c_hat.abs().square().sum((-2, -1)) * r_hat.abs().square().sum((-2, -1))).sum()
                rms = ((c.square().sum() + r.square().sum()) / (c.numel() + r.numel())).sqrt()
                n_weights = self.n_slices * c.shape[-2] * r.shape[-1]
                value = float(rms * n_weights**0.5 / gain2.sqrt().clamp_min(1e-30)) if gain2 > 0 else 1.0
            hit = (key, value)
            self.__dict__["_scale_cache"] = hit
        return hit[1]

    def factors(self):
        self._sync_frozen()
        core, core0 = self.tcurlora_core, self.tcurlora_core_init
        dt = compute_dtype(core.dtype)
        delta_core = (core.to(dt) - core0.to(dt)) * self.scale()
        core_hat = to_fourier(delta_core)
        if self.basis == "orthonormal":  # s Wc * (U - U0) * (Wr * R)
            core_hat = to_fourier(self.col_whiten.to(dt)) @ core_hat
        b = from_fourier(core_hat @ self._rows_hat(), self.n_slices)  # s (U - U0) * R : (L, r, n2)
        return [(self.cols.to(dt), b)]


def _combine_tcurlora(groups, weights, configs, combination_type):
    if combination_type not in (None, "linear"):
        raise ValueError(f"tCURLoRA combines adapters linearly (exact: the cores share C and R); "
                         f"combination_type={combination_type!r} is not supported, use 'linear'.")
    if len({getattr(c, "basis", "paper") for c in configs}) > 1:
        raise ValueError("tCURLoRA adapters combine only in one core basis; got "
                         f"basis={[getattr(c, 'basis', 'paper') for c in configs]}: retrain one of them in the other.")
    out = []
    for parts in zip(*groups):
        first = parts[0]
        if len({g.rank for g in parts}) > 1:
            raise ValueError(
                f"tCURLoRA adapters combine only at one rank per group (shared C and R); group {first.name!r} has "
                f"r={[g.rank for g in parts]}: combine adapters built with the same r and rank_pattern.")
        for g in parts[1:]:
            same_white = first.basis != "orthonormal" or (torch.equal(g.col_whiten, first.col_whiten)
                                                          and torch.equal(g.row_whiten, first.row_whiten))
            if not (torch.equal(g.col_idx, first.col_idx) and torch.equal(g.row_idx, first.row_idx) and same_white):
                raise ValueError(
                    f"Group {first.name!r}: the adapters selected different columns/rows (built on different "
                                 "base weights?), so their cores do not share C and R and cannot be combined exactly.")
        # each adapter's update is s_i C (U_i - U0_i) R with its own scale s_i (core_scale 1.0, 'auto', ...); the
        # combined adapter takes the first one's config, so its scale s_out is the first group's (same C and R):
        # U = U0 + sum_i w_i s_i / s_out (U_i - U0_i) gives s_out C (U - U0) R = sum_i w_i D_i exactly.
        # Computed in float64 (the load into the new group rounds once to its dtype).
        s_out = first.scale()
        u0 = first.tcurlora_core_init.detach().double()
        core = u0 + sum((w * g.scale() / s_out) * (g.tcurlora_core.detach().double()
                                                    - g.tcurlora_core_init.detach().double())
                        for w, g in zip(weights, parts))
        out.append({"tcurlora_core": core, "tcurlora_core_init": u0.clone(), "col_idx": first.col_idx.clone(),
                    "row_idx": first.row_idx.clone(), **first.combined_extras()})
    return copy.deepcopy(configs[0]), out


TCURLoraGroup.combine = classmethod(lambda cls, *a: _combine_tcurlora(*a))


class TCURLoraLayer(TensorGroupLayer):
    """An nn.Linear adapted by tCURLoRA."""


__all__ = ["TCURLoraGroup", "TCURLoraLayer"]
