from __future__ import annotations

import copy
import re

import torch
from torch import nn

from ...algebra import compute_dtype, from_fourier, to_fourier, truncated_t_svd
from .._dense_linear import dense_from_factors, group_dense_slices
from ..tensor_group import TensorGroup, TensorGroupLayer, cache_build


class LoraPTGroup(TensorGroup):
    """One group tensor's LoRA-PT state.

    Trainable: ``lorapt_U (L, n1, r)``, ``lorapt_S`` (``(L, r, r)``, or ``(L, r)`` for an f-diagonal core),
    ``lorapt_V (L, n2, r)``. Frozen and saved: their initial values ``*_init``, which define ``P0``. ``D = U * S * V^T
    - U0 * S0 * V0^T`` is applied as two t-products of thin factors, the second one frozen (``frozen_term=
    "factored"``), or each Linear runs with ``W - P0`` (its base weight with its rows of ``-P0`` folded in, held
    once per layer: :meth:`folded_weight`, :meth:`dense_parts`) as its weight (``frozen_term="dense"``), the trainable
    term staying factored unless ``delta_mode`` makes it dense too.
    """

    param_names = ("lorapt_U", "lorapt_S", "lorapt_V")

    @property
    def differentiable_factors(self) -> tuple[tuple[bool, bool], ...]:
        # U * (S * V^T), then (frozen_term='factored') the frozen U0 * -(S0 * V0^T)
        return ((True, True),) if self.frozen_term == "dense" else ((True, True), (False, False))

    @staticmethod
    def expected_shapes(spec, config) -> dict[str, tuple[int, ...]]:
        L, r = spec.n_slices, (spec.rank if spec.rank is not None else config.r)
        core = (L, r) if config.core == "diagonal" else (L, r, r)
        shapes = {"lorapt_U": (L, spec.n1, r), "lorapt_S": core, "lorapt_V": (L, spec.n2, r)}
        shapes.update({f"{k}_init": v for k, v in list(shapes.items())})
        return shapes

    def _configure(self, config) -> None:
        self.diagonal = config.core == "diagonal"
        self.factor_scale = getattr(config, "factor_scale", 1.0)
        self.core_gain = float(getattr(config, "core_gain", 1.0))
        self.frozen_term = getattr(config, "frozen_term", "factored")

    # Gain of each factor in factor_scale="auto": U, V and S each reach the weights with gain c at init (U and V
    # through S V^T and U S, whose norm is sigma_1; S through the orthonormal U, V). Unscaled, a plain SGD step moves
    # the weights by up to (2 sigma_1^2 + 1) times a step on the weights themselves; with c the first-order step is at
    # most 3 c^2 = 0.12 of it, no more than PEFT LoRA's at its defaults (lora_alpha = r, Kaiming A: r / (3 n_in) of
    # it, 0.13 for a 20-input Linear). Measured on PEFT's test MLP (SGD lr 0.5, 3 steps): c = 1 and c = 0.58 overflow,
    # c = 0.2 stays finite on all 8 seeds, as LoRA r=8 does.
    AUTO_GAIN = 0.2

    # factor_scale="per_component": a component's singular value is floored at this fraction of sigma_1, so a
    # (near-)zero component (rank-deficient weights) is not amplified by more than 100x
    COMPONENT_FLOOR = 0.01

    def scales(self) -> tuple[float | torch.Tensor, float]:
        """``(a_UV, a_S)``: the adapter uses ``U0 + a_UV (U - U0)``, ``V0 + a_UV (V - V0)``, ``S0 + a_S (S - S0)``.
        ``factor_scale='auto'``: ``(c / sigma_1, c * core_gain)`` with ``sigma_1`` the largest Fourier-slice singular
        value of the frozen ``S0`` and ``c = AUTO_GAIN``; ``'per_component'``: ``a_UV`` is a float64 tensor ``(r,)``,
        one scale per column of ``U`` and ``V``, ``c / max(sigma_i, COMPONENT_FLOOR sigma_1)`` with ``sigma_i`` the
        largest norm over the Fourier slices of row ``i`` or column ``i`` of ``S0`` (for the f-diagonal ``S0`` of a
        fresh adapter: the component's singular value), so a step on any column reaches the weights with gain ``c``;
        both cached while ``S0`` is unchanged. A number ``a``: ``(a, a * core_gain)``; 1.0 with ``core_gain`` 1.0:
        unscaled."""
        g = self.core_gain
        if self.factor_scale not in ("auto", "per_component"):
            return float(self.factor_scale), float(self.factor_scale) * g
        s0 = self.lorapt_S_init
        key = (s0.data_ptr(), s0._version, s0.device, self.factor_scale)
        hit = self.__dict__.get("_scale_cache")
        if hit is None or hit[0] != key:
            with torch.no_grad():
                core = to_fourier(torch.diag_embed(s0.double()) if self.diagonal else s0.double())
                sigma1 = float(torch.linalg.matrix_norm(core, ord=2).max())
                c = self.AUTO_GAIN
                if self.factor_scale == "auto":
                    a = c / sigma1 if sigma1 > 0 else c
                elif sigma1 > 0:  # per component: U's column i meets row i of S V^T, V's column i column i of U S
                    sigma = torch.maximum(core.norm(dim=-1), core.norm(dim=-2)).amax(0)  # (r,), real
                    a = c / sigma.clamp_min(self.COMPONENT_FLOOR * sigma1)
                else:
                    a = torch.full((s0.shape[-1],), c, dtype=torch.float64, device=s0.device)
            hit = (key, (a, c))
            self.__dict__["_scale_cache"] = hit
        return hit[1][0], hit[1][1] * g

    def _init_from_weight(self, weight: torch.Tensor, config) -> None:
        svd = truncated_t_svd(weight, self.rank, method=config.svd_method)
        s = torch.diagonal(svd.S, dim1=-2, dim2=-1) if self.diagonal else svd.S
        for name, value in (("U", svd.U), ("S", s), ("V", svd.V)):
            value = value.contiguous()
            self.register_buffer(f"lorapt_{name}_init", value.clone())
            if not config.init_weights:
                value = value + 0.1 * value.abs().mean() * torch.randn_like(value)
            setattr(self, f"lorapt_{name}", nn.Parameter(value.clone()))

    def term_ranks(self) -> tuple[int, ...]:
        # U * (S V^T) and (frozen_term='factored') the frozen U0 * -(S0 V0^T)
        return (self.rank,) if self.frozen_term == "dense" else (self.rank, self.rank)

    def _core_times_vt(self, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s_hat = to_fourier(torch.diag_embed(s) if self.diagonal else s)
        return from_fourier(s_hat @ to_fourier(v).mH, self.n_slices)  # S * V^T : (L, r, n2)

    def effective_factor(self, name: str, suffix: str = "") -> torch.Tensor:
        """The factor ``name`` (``"U"``, ``"S"``, ``"V"``) as the adapter applies it, detached, float64
        (combinations are computed in float64 and rounded once when loaded into the combined group):
        ``X0 + a (X - X0)`` for the trainable one (``suffix=""``), ``X0`` itself for ``suffix="_init"``."""
        x0 = getattr(self, f"lorapt_{name}_init").detach().double()
        if suffix == "_init":
            return x0
        a, a_s = self.scales()
        return x0 + (getattr(self, f"lorapt_{name}").detach().double() - x0) * (a_s if name == "S" else a)

    def factors(self):
        a, a_s = self.scales()
        dt = compute_dtype(self.lorapt_U.dtype)  # float32, or float64 for a float64 model
        u, s, v = self.lorapt_U.to(dt), self.lorapt_S.to(dt), self.lorapt_V.to(dt)
        per_column = isinstance(a, torch.Tensor)  # one scale per column of U and V (factor_scale='per_component')
        # X0 + a (X - X0): exactly X0 at init (a * 0 = 0), the identity stays bit-exact
        if per_column or (a, a_s) != (1.0, 1.0):
            a = a.to(device=u.device, dtype=dt) if per_column else a
            u_init, s_init, v_init = self.lorapt_U_init.to(dt), self.lorapt_S_init.to(dt), self.lorapt_V_init.to(dt)
            u, s, v = u_init + (u - u_init) * a, s_init + (s - s_init) * a_s, v_init + (v - v_init) * a
        g = self._core_times_vt(s, v)
        if self.frozen_term == "dense":
            return [(u, g)]  # -P0 is folded into the layers' weights (folded_weight) or held (frozen_dense)
        return [(u, g), (self.lorapt_U_init.to(dt), self._minus_g0())]

    def _minus_g0(self) -> torch.Tensor:
        """``-(S0 * V0^T)``: frozen, so computed once and kept until the initial factors change (load, device move)."""
        key = tuple((t._version, t.data_ptr()) for t in (self.lorapt_S_init, self.lorapt_V_init))
        hit = self.__dict__.get("_g0")
        if hit is None or hit[0] != key:
            with cache_build():
                dt = compute_dtype(self.lorapt_S_init.dtype)
                hit = (key, -self._core_times_vt(self.lorapt_S_init.to(dt), self.lorapt_V_init.to(dt)))
            self.__dict__["_g0"] = hit
        return hit[1]


    # -- frozen_term='dense': -P0 (mixed batches, convolutions) and W - P0 per Linear ---------------------------------
    def frozen_dense(self, device=None, hold: bool = True) -> torch.Tensor:
        """``-P0 = -(U0 * S0 * V0^T)`` ``(L, n1, n2)`` float32, built from the saved initial factors through the FFT
        (no decomposition) and kept off the module (never saved) until they change (load, device move, cast);
        ``hold=False``: not kept (merging), unless it already is."""
        key = self._inits_key()
        hit = self.__dict__.get("_p0")
        if not hold and (hit is None or hit[0] != key):
            with torch.no_grad():
                p0 = self._build_minus_p0()
            return p0 if device is None else p0.to(device)
        if hit is None or hit[0] != key:
            self.__dict__["_p0"] = None  # drop the stale one before building the new one
            with cache_build():
                hit = (key, self._build_minus_p0(), {})
            self.__dict__["_p0"] = hit
        if device is None or torch.device(device) == hit[1].device:
            return hit[1]
        device = torch.device(device)
        if device not in hit[2]:
            with cache_build():
                hit[2][device] = hit[1].to(device)
        return hit[2][device]

    def _build_minus_p0(self) -> torch.Tensor:
        """``-P0`` ``(L, n1, n2)`` from the saved initial factors, through the FFT (no decomposition)."""
        return dense_from_factors([(self.lorapt_U_init, self._minus_g0())])

    def _frozen_slices(self, device=None) -> list[torch.Tensor]:
        return list(self.frozen_dense(device).unbind(0))

    def prefers_dense(self, n_tokens: int) -> bool:
        # frozen_term='dense' always goes through the layer's dense path (which asks dense_parts what is dense)
        return self.frozen_term == "dense" or super().prefers_dense(n_tokens)

    def _inits_key(self) -> tuple:
        return tuple((t._version, t.data_ptr(), t.device, t.dtype)
                     for t in (self.lorapt_U_init, self.lorapt_S_init, self.lorapt_V_init))

    def folded_weight(self, layer) -> torch.Tensor:
        """``W - P0`` for the Linear ``layer`` of this group (its weight with this group's frozen rows of ``-P0``
        added), in the weight's dtype and device: held off the module (never saved) until the weight or the initial
        factors change (load, device move, cast, merge/unmerge, an in-place edit). All stale layers of the group are
        rebuilt together from one ``-P0`` (built through the FFT, used, dropped), so the group holds one weight-sized
        copy, and a step runs ``x (W - P0)^T`` with no weight-sized addition."""
        held = self.__dict__.setdefault("_folded", {})
        inits = self._inits_key()

        def key(w: torch.Tensor) -> tuple:
            return (w.data_ptr(), w._version, w.dtype, w.device, inits)

        hit = held.get(id(layer))
        if hit is not None and hit[0] == key(layer.get_base_layer().weight):
            return hit[1]
        rows: dict[int, tuple] = {}
        for k, (src, r0, r1) in enumerate(self._sources):
            if not src.is_conv:
                rows.setdefault(id(src), (src, []))[1].append((k, r0, r1))
        stale = [(src, ks) for lid, (src, ks) in rows.items()
                 if held.get(lid) is None or held[lid][0] != key(src.get_base_layer().weight)]
        for src, _ in stale:
            held.pop(id(src), None)  # drop the stale copies before building the new ones
        with cache_build():
            hit = self.__dict__.get("_p0")
            minus_p0 = hit[1] if hit is not None and hit[0] == inits else self._build_minus_p0()
            for src, ks in stale:
                w = src.get_base_layer().weight
                out = w.detach().to(compute_dtype(w.dtype), copy=True)
                for k, r0, r1 in ks:
                    out[r0:r1] += minus_p0[k].to(out.device)
                held[id(src)] = (key(w), out.to(w.dtype))
            del minus_p0
        return held[id(layer)][1]

    def base_weight_changed(self, layer) -> None:
        self.__dict__.get("_folded", {}).pop(id(layer), None)

    def dense_parts(self, layer, weight: torch.Tensor, device, n_tokens: int):
        """What the layer's dense path uses (see :func:`.._dense_linear.dense_layer_forward`), as ``(weight, slice
        sets, remainder)``. ``frozen_term='dense'``: the held ``W - P0`` as the weight (the frozen term costs nothing
        per step; when another adapter already replaced the weight, or the base weight trains, the held ``-P0``
        slices are added instead), plus this forward's trainable ``D`` if ``delta_mode`` asks for a dense update
        here, else the trainable term factored as the remainder."""
        if self.frozen_term != "dense":
            return weight, [group_dense_slices(self, device)], None
        base = layer.get_base_layer().weight
        sets = []
        if weight is base and not base.requires_grad:
            weight = self.folded_weight(layer)
        else:
            sets.append(self._frozen_slices(device))
        if TensorGroup.prefers_dense(self, n_tokens):
            return weight, [group_dense_slices(self, device)] + sets, None
        return weight, sets, lambda x, slice_ids, **kw: TensorGroup.delta_output(self, x, slice_ids, **kw)

    def delta_output(self, x: torch.Tensor, slice_ids: tuple[int, ...], cast_input: bool = True) -> torch.Tensor:
        """``[D_k x]`` (see :meth:`TensorGroup.delta_output`); with ``frozen_term='dense'`` the held ``-P0`` rows are
        applied as one matmul (the paths that do not change the weight: mixed batches)."""
        y = super().delta_output(x, slice_ids, cast_input)
        if self.frozen_term == "dense":
            frozen = self._frozen_slices(x.device)
            rows = torch.cat([frozen[k] for k in slice_ids])  # (m n1, n2)
            x2 = x.reshape(-1, self.n2)
            y = y + ((x2.to(rows.dtype) if cast_input else x2) @ rows.t()).reshape(y.shape)
        return y

    def dense_delta(self) -> torch.Tensor:
        d = super().dense_delta()
        return d + self.frozen_dense(d.device, hold=False) if self.frozen_term == "dense" else d

    def current_dense(self, device=None) -> list[torch.Tensor]:
        slices = super().current_dense(device)
        if self.frozen_term != "dense":
            return slices
        return [s + f for s, f in zip(slices, self._frozen_slices(slices[0].device))]


def _combine_lorapt(groups, weights, configs, combination_type):
    if combination_type not in (None, "cat"):
        raise ValueError(f"LoRA-PT combines adapters exactly by concatenation (combination_type='cat', as LoRA's); "
                         f"{combination_type!r} is not supported.")
    diagonal = all(c.core == "diagonal" for c in configs)
    config = copy.deepcopy(configs[0])
    config.r = sum(c.r for c in configs)
    config.core = "diagonal" if diagonal else "full"
    config.factor_scale = 1.0  # the sources' scales are baked into the combined factors (effective_factor)
    config.core_gain = 1.0
    # per-group ranks (rank_pattern, rank_cap) add up group by group: the combined config names each group whose sum
    # is not its r, module by module (anchored keys, PEFT's matching), and caps nothing
    config.rank_cap = False
    config.rank_pattern = {}
    for parts in zip(*groups):
        first, rank = parts[0], sum(g.rank for g in parts)
        if rank > min(first.n1, first.n2):
            raise ValueError(
                f"LoRA-PT combines adapters by concatenation, so group {first.name!r} would need tubal rank "
                f"{' + '.join(str(g.rank) for g in parts)} = {rank}, above what its {first.n1} x {first.n2} slices "
                f"allow ({min(first.n1, first.n2)}): combine fewer adapters, or adapters of lower rank there "
                "(rank_pattern).")
        if rank != config.r:
            config.rank_pattern.update({"^" + re.escape(m): rank for m in first.members})
    out = []
    for parts in zip(*groups):
        tensors = {}
        for suffix in ("", "_init"):
            us = [g.effective_factor("U", suffix) for g in parts]
            vs = [g.effective_factor("V", suffix) for g in parts]
            cores = []
            for w, g in zip(weights, parts):
                s = g.effective_factor("S", suffix)
                if diagonal:
                    cores.append(w * s)
                else:
                    cores.append(w * (torch.diag_embed(s) if g.diagonal else s))
            if diagonal:
                core = torch.cat(cores, dim=-1)
            else:  # block-diagonal per slice: U' S' V'^T = sum_i w_i U_i S_i V_i^T (t-products are block-wise)
                core = torch.stack([torch.block_diag(*[c[k] for c in cores]) for k in range(cores[0].shape[0])])
            tensors[f"lorapt_U{suffix}"] = torch.cat(us, dim=-1)
            tensors[f"lorapt_S{suffix}"] = core
            tensors[f"lorapt_V{suffix}"] = torch.cat(vs, dim=-1)
        out.append(tensors)
    return config, out


LoraPTGroup.combine = classmethod(lambda cls, *a: _combine_lorapt(*a))


class LoraPTLayer(TensorGroupLayer):
    """An nn.Linear adapted by LoRA-PT."""


__all__ = ["LoraPTGroup", "LoraPTLayer"]
