"""HyPS layers: an ``nn.Linear`` or a convolution (``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``) wrapped with a
parallel principal-SVD branch and a serial bottleneck branch.

Convolution kernels are matricised as ``weight.reshape(weight.shape[0], -1)``: ``out x (in * prod(k))`` for a
convolution, ``in x (out * prod(k))`` for a transposed one. That is the im2col matrix the convolution multiplies the
unfolded input with (a transposed convolution is its adjoint), so the parallel branch is the linear HyPS on the
unfolded input, a ``1x1x1`` convolution is exactly a Linear, the rank-r update factors into two cheap convolutions
(``r`` kernels of the layer's own shape and a ``1x1x1`` channel mix) instead of a dense kernel per step, and the
trainable count ``r * (rows + cols)`` is the one of PEFT LoRA's Conv3d at the same rank.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..._peft_compat import (
    BaseTunerLayer,
    BufferDict,
    cast_input_dtype,
    check_adapters_to_merge,
    conv_forward,
    move_adapter_to_base_device,
    transposed_output_padding,
)
from ...errors import AdapterLoadError, MergeError, RankError
from .._loading_context import inside_init_empty_weights, is_loading_adapter
from .._mixed_batch import check_mixed_batch, sub_batches
from .._targets import CONV_TYPES
from .config import HyPSConfig

__all__ = ["CONV_TYPES", "Conv", "HyPSLayer", "Linear", "SUPPORTED_TYPES", "principal_factors",
           "refuse_partial_load"]

SUPPORTED_TYPES = (nn.Linear,) + CONV_TYPES  # convolutions with groups=1 only (the tuner refuses others by name)


def principal_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-r principal factors of a weight matrix, PiSSA style.

    Args:
        weight: (out, in) matrix, any floating dtype.
        r: rank, ``1 <= r <= min(out, in)``.

    Returns:
        ``A = U_r S_r^(1/2)`` (out x r) and ``B = S_r^(1/2) V_r^T`` (r x in), in float32, on ``weight``'s device, so
        that ``A @ B`` is the best rank-r approximation of ``weight``.

    The top singular pairs come from the eigendecomposition of the smaller Gram matrix (``W W^T`` or ``W^T W``) in
    float64: for the leading singular values this is as accurate as an SVD (relative error ~1e-12) and several times
    faster than a full SVD (9x for SwinUNETR-48's 768 x 3072 patch-merging layer on one CPU core). Devices without
    float64 (MPS) use a float32 SVD instead. Singular vectors have arbitrary signs, which is why adapters store the
    initial factors instead of recomputing them at load time.
    """
    if weight.device.type == "mps":
        u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
        root = s[:r].sqrt()
        return (u[:, :r] * root).float(), (root[:, None] * vh[:r]).float()

    w = weight.detach().to(torch.float64)
    with _single_threaded_on_cpu(w.device):
        return _principal_factors_gram(w, r)


@contextlib.contextmanager
def _single_threaded_on_cpu(device: torch.device):
    """Run CPU LAPACK single-threaded. A 768 x 768 eigh takes 0.3 s on one core, but 20 s and more with two threads on
    a busy machine (threaded LAPACK spin-waits for cores that other processes hold). Restores the setting after."""
    if device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _principal_factors_gram(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    out_features, in_features = w.shape
    tiny = torch.finfo(torch.float64).tiny
    if out_features <= in_features:
        evals, evecs = torch.linalg.eigh(w @ w.T)  # ascending
        u_r = evecs[:, -r:].flip(-1)  # (out, r), leading first
        sigma = evals[-r:].flip(-1).clamp_min(0).sqrt()
        a = u_r * sigma.sqrt()
        b = (u_r.T @ w) / sigma.clamp_min(tiny).sqrt()[:, None]  # S^(-1/2) U^T W = S^(1/2) V^T
    else:
        evals, evecs = torch.linalg.eigh(w.T @ w)
        v_r = evecs[:, -r:].flip(-1)  # (in, r)
        sigma = evals[-r:].flip(-1).clamp_min(0).sqrt()
        a = (w @ v_r) / sigma.clamp_min(tiny).sqrt()  # W V S^(-1/2) = U S^(1/2)
        b = sigma.sqrt()[:, None] * v_r.T
    return a.to(torch.float32), b.to(torch.float32)


def matrix_shape(base: nn.Module) -> tuple[int, int]:
    """(rows, cols) of the matrix HyPS factorises: ``weight.reshape(weight.shape[0], -1)`` (a Linear's own weight)."""
    return base.weight.shape[0], base.weight[0].numel()


def describe_matrix(base: nn.Module) -> str:
    """``"Linear"``, or e.g. ``"Conv3d (kernel matricised as out x in*3x3x3)"``, for error messages."""
    if isinstance(base, nn.Linear):
        return "Linear"
    k = "x".join(str(s) for s in base.kernel_size)
    return f"{type(base).__name__} (kernel matricised as {'in x out' if base.transposed else 'out x in'}*{k})"


class HyPSLayer(BaseTunerLayer):
    """Per-adapter state of a HyPS-wrapped layer.

    Trainable (``adapter_layer_names``): ``hyps_A`` (out x r), ``hyps_B`` (r x in), ``hyps_down`` (Linear out -> d,
    no bias), ``hyps_up`` (Linear d -> out, no bias). Frozen and saved (``other_param_names``): ``hyps_A0``,
    ``hyps_B0`` (persistent buffers with the initial factors), plus plain per-adapter settings from the config. An
    adapter with a branch switched off simply has no entry in that branch's containers.

    Saved and loaded: exactly those six tensors per layer (``A``, ``B``, ``A0``, ``B0``, ``Down``, ``Up``; the file
    names them ``<layer>.hyps_A`` ... ``<layer>.hyps_down.weight``). The frozen residual ``W - A0 B0`` is never stored
    nor materialised: every forward computes ``W x + (A - A0) B x + A0 (B - B0) x`` from the unmodified base weight
    ``W`` and the saved factors, so nothing needs the SVD once a file is loaded. An adapter added while loading
    (inside :func:`~peft_tensor.tuners._loading_context.loading_adapter`, which every loader enters) or under
    ``low_cpu_mem_usage=True`` is built empty, without the SVD, and filled by the state dict; a file that holds some
    but not all of its tensors is refused (:class:`~peft_tensor.errors.AdapterLoadError` naming the missing keys).
    """

    adapter_layer_names = ("hyps_A", "hyps_B", "hyps_down", "hyps_up")
    other_param_names = ("hyps_A0", "hyps_B0", "hyps_r", "hyps_d", "hyps_scale", "hyps_dropout", "hyps_pending")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.hyps_A = nn.ParameterDict({})
        self.hyps_B = nn.ParameterDict({})
        # Persistent so that a saved adapter carries the exact initial factors: recomputing the SVD at load time could
        # flip singular-vector signs and would no longer cancel A @ B.
        self.hyps_A0 = BufferDict({}, persistent=True)
        self.hyps_B0 = BufferDict({}, persistent=True)
        self.hyps_down = nn.ModuleDict({})
        self.hyps_up = nn.ModuleDict({})
        self.hyps_r: dict[str, int] = {}
        self.hyps_d: dict[str, int] = {}
        self.hyps_scale: dict[str, float] = {}
        # A plain probability, not an nn.Dropout module: a module name ending in "dropout" would be matched by
        # modules_to_save=["out"] (PEFT matches modules_to_save by bare suffix).
        self.hyps_dropout: dict[str, float] = {}
        # Adapters built empty for a file (loading, low_cpu_mem_usage) that nothing was loaded into yet: their config,
        # to initialise them (SVD) if they are used first. Not saved.
        self.hyps_pending: dict[str, HyPSConfig] = {}
        # PEFT's switch (peft.helpers.disable_input_dtype_casting): off, the branches get the input in its own dtype
        self.cast_input_dtype_enabled: bool = True
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs

        base = self.get_base_layer()
        if not isinstance(base, SUPPORTED_TYPES):  # the tuner checks this first; this guards direct construction
            raise TypeError(f"HyPS wraps nn.Linear and convolutions only, got {type(base).__name__}.")
        if isinstance(base, nn.Linear):
            self.in_features = base.in_features
            self.out_features = base.out_features
        else:
            if base.groups != 1:
                raise TypeError(f"HyPS wraps convolutions with groups=1 only, got groups={base.groups}.")
            self.in_features = base.in_channels
            self.out_features = base.out_channels
        # The matrix the parallel branch factorises: the weight itself for a Linear, weight.reshape(shape[0], -1)
        # for a convolution (see the module docstring).
        self.matrix_shape = matrix_shape(base)

    def update_layer(self, adapter_name: str, config: HyPSConfig, layer_name: str = "",
                     r: Optional[int] = None) -> None:
        """Create (or re-create) the adapter ``adapter_name`` on this layer from ``config``, at rank ``r`` (the tuner
        resolves it from ``rank_pattern`` and ``rank_cap``; default ``config.r``)."""
        r = config.r if r is None else r
        rows, cols = self.matrix_shape
        where = f" at {layer_name!r}" if layer_name else ""
        if config.parallel and r > min(rows, cols):
            raise RankError(
                f"HyPS r={r} exceeds min(out, in)={min(rows, cols)} of the "
                f"{describe_matrix(self.get_base_layer())}{where} ({rows} x {cols}). Pass rank_pattern="
                f"{{{layer_name or '<name>'!r}: {min(rows, cols)}}} or rank_cap=True, choose r <= {min(rows, cols)}, "
                "or add that layer to exclude_modules."
            )

        for attr in self.adapter_layer_names + self.other_param_names:  # re-creation must not keep stale branches
            container = getattr(self, attr)
            if adapter_name in container:
                del container[adapter_name]
        self.hyps_r[adapter_name] = r
        self.hyps_d[adapter_name] = config.d
        self.hyps_scale[adapter_name] = config.serial_scale
        self.hyps_dropout[adapter_name] = config.dropout

        # Loading (inside loading_adapter(), entered by every loader, or under low_cpu_mem_usage=True): the factors
        # are built empty, no SVD, and the state dict fills them; whatever this adapter is used for before anything
        # was loaded into it initialises it first (_materialize).
        device = self.get_base_layer().weight.device
        deferred = is_loading_adapter() or inside_init_empty_weights() or device.type == "meta"
        if config.parallel:
            self.hyps_A0[adapter_name] = torch.empty(rows, r, device=device)
            self.hyps_B0[adapter_name] = torch.empty(r, cols, device=device)
            self.hyps_A[adapter_name] = nn.Parameter(torch.empty(rows, r, device=device))
            self.hyps_B[adapter_name] = nn.Parameter(torch.empty(r, cols, device=device))
            if not deferred:
                self._init_parallel(adapter_name, config)
        if config.serial:
            down, up = self._make_bottleneck(config.d, device)
            self.hyps_down[adapter_name] = down
            self.hyps_up[adapter_name] = up
            if not deferred:
                self._init_serial(adapter_name, config)
        if deferred:
            self.hyps_pending[adapter_name] = config

        move_adapter_to_base_device(self, adapter_name)
        self.set_adapter(self.active_adapters)

    # ------------------------------------------------------------------------------------------- initialisation

    def _unmerged_weight(self) -> torch.Tensor:
        """The base weight with every merged parallel branch subtracted (float32 when an adapter is merged): adding an
        adapter while another one is merged gives the same adapter."""
        weight = self.get_base_layer().weight.detach()
        if not self.merged_adapters:
            return weight
        weight = weight.float()
        for merged in self.merged_adapters:
            if self._has_parallel(merged):
                weight = weight - self.get_delta_weight(merged).float()
        return weight

    def _set_initial(self, tensor: torch.Tensor, value: torch.Tensor) -> None:
        """Write an initial value into an adapter tensor in place (an optimiser may already hold it), rounded through
        the base weight's dtype as a freshly built adapter is (PEFT moves it to the base dtype, then upcasts)."""
        base_dtype = self.get_base_layer().weight.dtype
        if base_dtype.is_floating_point:
            value = value.to(base_dtype)
        tensor.data.copy_(value)

    def _init_parallel(self, adapter: str, config: HyPSConfig) -> None:
        """``A0 = A = U_r S_r^(1/2)``, ``B0 = B = S_r^(1/2) V_r^T`` of the (unmerged) base weight: the SVD."""
        rows, cols = self.matrix_shape
        with torch.no_grad():
            a0, b0 = principal_factors(self._unmerged_weight().reshape(rows, cols), self.hyps_r[adapter])
            a, b = a0, b0
            if not config.init_weights:
                # A visibly non-trivial adapter for tests: perturb the trainable copies, keep A0/B0 the true factors.
                a = a + 0.1 * a.abs().mean().clamp_min(1e-3) * torch.randn_like(a)
                b = b + 0.1 * b.abs().mean().clamp_min(1e-3) * torch.randn_like(b)
            for tensor, value in ((self.hyps_A0[adapter], a0), (self.hyps_B0[adapter], b0),
                                  (self.hyps_A[adapter], a), (self.hyps_B[adapter], b)):
                self._set_initial(tensor, value)

    def _init_serial(self, adapter: str, config: HyPSConfig) -> None:
        """``Down``: Kaiming-uniform with mirrored rows; ``Up``: zeros (``init_weights=False``: small normal)."""
        down, up = self.hyps_down[adapter].weight, self.hyps_up[adapter].weight
        with torch.no_grad():
            d = torch.empty(down.shape, device=down.device)
            nn.init.kaiming_uniform_(d, a=math.sqrt(5))
            # Mirrored rows (w, -w): every token with Down(h) != 0 activates one unit of each pair, so the ReLU
            # bottleneck is never dead on arrival. With independent rows, activations h that share a dominant
            # direction (UNETR's attn.out_proj at init) can put every unit in the ReLU's zero region for every token:
            # Down and Up then never get a gradient (issue 13).
            pairs = config.d // 2
            d[1 : 2 * pairs : 2] = -d[0 : 2 * pairs : 2]
            u = torch.zeros(up.shape, device=up.device)
            if not config.init_weights:
                nn.init.normal_(u, std=1.0 / config.d)
            self._set_initial(down, d)
            self._set_initial(up, u)

    def _on_meta(self, adapter: str) -> bool:
        return any(t.device.type == "meta" for t in self._adapter_tensors(adapter).values())

    def _materialize(self, adapter: str) -> None:
        """Initialise an adapter that was built empty for a file but used before anything was loaded into it (no-op
        for any other adapter). The SVD runs then, once."""
        config = self.hyps_pending.get(adapter)
        if config is None or self._on_meta(adapter) or self.get_base_layer().weight.device.type == "meta":
            return
        del self.hyps_pending[adapter]
        if self._has_parallel(adapter):
            self._init_parallel(adapter, config)
        if self._has_serial(adapter):
            self._init_serial(adapter, config)

    def _adapter_tensors(self, adapter: str, prefix: str = "") -> dict[str, torch.Tensor]:
        """The saved tensors of ``adapter`` on this layer, by state-dict key (``prefix`` + e.g. ``hyps_A.default``,
        ``hyps_down.default.weight``)."""
        out = {}
        for attr in ("hyps_A", "hyps_B", "hyps_A0", "hyps_B0"):
            if adapter in getattr(self, attr):
                out[f"{prefix}{attr}.{adapter}"] = getattr(self, attr)[adapter]
        for attr in ("hyps_down", "hyps_up"):
            if adapter in getattr(self, attr):
                for name, t in getattr(self, attr)[adapter].state_dict(keep_vars=True).items():
                    out[f"{prefix}{attr}.{adapter}.{name}"] = t
        return out

    def _make_bottleneck(self, d: int, device: torch.device) -> tuple[nn.Module, nn.Module]:
        """The serial branch's ``Down`` (out -> d) and ``Up`` (d -> out), bias-free, on the layer's output features:
        Linears for a Linear, ``1x1x1`` convolutions of the layer's dimension for a convolution."""
        base = self.get_base_layer()
        if isinstance(base, nn.Linear):
            return (nn.Linear(self.out_features, d, bias=False, device=device),
                    nn.Linear(d, self.out_features, bias=False, device=device))
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[base.weight.dim() - 3]
        return (conv(self.out_features, d, 1, bias=False, device=device),
                conv(d, self.out_features, 1, bias=False, device=device))

    def _adapted_forward(self, x: torch.Tensor, args: tuple, kwargs: dict, adapter_names: Optional[list[str]],
                         *extra: Any) -> torch.Tensor:
        """The forward of every HyPS layer: the base layer, then each active adapter (``_apply_adapter(adapter, x,
        result, *extra)``), or per-adapter sub-batches for ``adapter_names``; the output in the base output's dtype."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        for adapter in list(self.hyps_pending):
            self._materialize(adapter)
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        if adapter_names is not None:
            check_mixed_batch(x, adapter_names)
            out = result.clone()
            for adapter, rows in sub_batches(adapter_names, x.device):
                out[rows] = self._apply_adapter(adapter, x[rows], result[rows], *extra).to(result_dtype)
            return out
        for adapter in self.active_adapters:
            result = self._apply_adapter(adapter, x, result, *extra)
        return result.to(result_dtype)

    # ----------------------------------------------------------------------------------------------------- merging

    def _has_parallel(self, adapter: str) -> bool:
        return adapter in self.hyps_A

    def _has_serial(self, adapter: str) -> bool:
        return adapter in self.hyps_down

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``A @ B - A0 @ B0`` for ``adapter`` in the base weight's shape (out x in, or a kernel folded back from its
        matricisation) and dtype, computed in float32 or wider."""
        self._materialize(adapter)
        weight = self.get_base_layer().weight
        compute = torch.promote_types(self.hyps_A[adapter].dtype, torch.float32)
        a, b = self.hyps_A[adapter].to(compute), self.hyps_B[adapter].to(compute)
        a0, b0 = self.hyps_A0[adapter].to(compute), self.hyps_B0[adapter].to(compute)
        return (a @ b - a0 @ b0).reshape(weight.shape).to(weight.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the parallel branch ``A B - A0 B0`` of each adapter to the base weight.

        Raises:
            MergeError: an adapter to merge has a serial branch (checked for all adapters before anything changes),
                or, with ``safe_merge``, the merged weight would contain NaN/inf.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        for adapter in adapter_names:
            if self._has_serial(adapter):
                raise MergeError(serial_merge_message(adapter))

        base_layer = self.get_base_layer()
        for adapter in adapter_names:
            if not self._has_parallel(adapter):
                continue
            delta = self.get_delta_weight(adapter)
            if safe_merge:
                merged = base_layer.weight.data + delta
                if not torch.isfinite(merged).all():
                    raise MergeError(
                        f"NaN/inf in the merged weight of HyPS adapter {adapter!r}: its factors are broken (diverged "
                        "training or a corrupted file). The base weight was left unchanged; check the adapter."
                    )
                base_layer.weight.data = merged
            else:
                base_layer.weight.data += delta
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract every merged parallel branch from the base weight again."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if self._has_parallel(adapter):
                self.get_base_layer().weight.data -= self.get_delta_weight(adapter)


def incomplete_load_message(prefix: str, adapter: str, keys: list[str]) -> str:
    """A file that holds some, not all, of the tensors of a HyPS adapter (keys named as the file names them)."""
    file_keys = []  # a file names them without the adapter: "<layer>.hyps_A0", "<layer>.hyps_down.weight"
    for key in keys:
        attr, _, rest = key[len(prefix):].partition(f".{adapter}")
        file_keys.append(prefix + attr + rest)
    return (f"The adapter file lacks tensors that the HyPS layer {prefix.rstrip('.')!r} needs to reproduce the "
            f"trained adapter {adapter!r}: {', '.join(file_keys)}. Loading it would leave them uninitialised. The "
            "file is incomplete (truncated, filtered, or written for another config): save the adapter again from "
            "the trained model with save_pretrained.")


def refuse_partial_load(module: nn.Module, incompatible_keys) -> None:
    """Load post-hook of the HyPS tuner: a load that filled an adapter on some layers must fill every layer on which
    that adapter was built empty for a file (a layer the file lacks would keep uninitialised factors)."""
    layers = [m for m in module.modules() if isinstance(m, HyPSLayer)]
    seen = [m.__dict__.pop("_hyps_load_seen", None) for m in layers]
    loaded = {a for s in seen if s is not None for a, got in s[1].items() if got}
    for layer, s in zip(layers, seen):
        if s is None:
            continue
        prefix, got = s
        for adapter in sorted(loaded & set(layer.hyps_pending)):
            if not got.get(adapter, True):
                raise AdapterLoadError(incomplete_load_message(prefix, adapter,
                                                               list(layer._adapter_tensors(adapter, prefix))))


def serial_merge_message(adapter: str) -> str:
    return (
        f"HyPS adapter {adapter!r} has a serial branch, y = h + scale * Up(ReLU(Down(h))). It is non-linear in the "
        "layer input, so it cannot be folded into the layer's weight. Either run unmerged inference (the PeftModel "
        "works as is; only the parallel branch is mergeable), use unload() to drop the adapter without merging, or "
        "train with HyPSConfig(serial=False) for a fully mergeable parallel-only adapter."
    )


def _add_matmul(result: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``result + alpha * u @ weight.T`` for result (..., out), u (..., k), weight (out, k).

    One fused ``addmm`` pass when the dtypes agree (the common float32 case); otherwise the adapter output is computed
    in the adapter's dtype and cast to the base output's dtype before the addition.
    """
    if result.dtype == u.dtype == weight.dtype:
        flat = torch.addmm(result.reshape(-1, result.shape[-1]), u.reshape(-1, u.shape[-1]), weight.t(), alpha=alpha)
        return flat.view(result.shape)
    return result + (alpha * _linear(u, weight)).to(result.dtype)


def _linear(u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``u @ weight.T`` for u (..., k), weight (out, k) as one ``mm`` over the flattened leading dims: not ``F.linear``
    / ``torch.matmul``, whose kernel choice depends on ``requires_grad`` (see :func:`_channel_mix`)."""
    return torch.mm(u.reshape(-1, u.shape[-1]), weight.t()).view(*u.shape[:-1], weight.shape[0])


class _HyPSModule(nn.Module, HyPSLayer):
    """What the wrapped Linear and convolution share: construction (the first adapter built at wrap time)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: HyPSConfig, layer_name: str = "",
                 r: Optional[int] = None, **kwargs):
        super().__init__()
        HyPSLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, layer_name=layer_name, r=r)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # Saving an adapter that was built empty and never loaded saves its initialisation (run now); inside a load
        # (PEFT's set_peft_model_state_dict reads model.state_dict() for its keys first) and on the meta device
        # (low_cpu_mem_usage=True) the empty tensors are returned as they are, as the tensor methods do.
        if self.hyps_pending and not is_loading_adapter():
            for adapter in list(self.hyps_pending):
                self._materialize(adapter)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # An adapter built empty for a file: the file must hold every tensor of it, or the missing ones would stay
        # uninitialised memory (or, initialised, an untrained adapter) -- refuse before anything is loaded. A load
        # that holds none of them is not about this adapter (the model-level check refuses a file that lacks a whole
        # layer of an adapter it loads: HyPSModel).
        seen = {}
        for adapter in list(self.hyps_pending):
            keys = self._adapter_tensors(adapter, prefix)
            present = [k for k in keys if k in state_dict]
            seen[adapter] = bool(present)
            if not present:
                continue
            missing = [k for k in keys if k not in state_dict]
            if missing:
                raise AdapterLoadError(incomplete_load_message(prefix, adapter, missing))
            del self.hyps_pending[adapter]
        self.__dict__["_hyps_load_seen"] = (prefix, seen)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class Linear(_HyPSModule):
    """HyPS around an ``nn.Linear``.

    Forward, for input x (..., in) and each active adapter in order:
    ``h = base(x) + (A B - A0 B0) drop(x)`` (parallel, as a rank-2r product; skipped if merged), then
    ``h = h + scale * Up(ReLU(Down(drop(h))))`` (serial). Adapter math runs in the adapter's dtype (float32 under
    PEFT's autocast for float16/bfloat16 bases) and the output is cast back to the base output dtype.
    """

    def forward(self, x: torch.Tensor, *args: Any, adapter_names: Optional[list[str]] = None,
                **kwargs: Any) -> torch.Tensor:
        return self._adapted_forward(x, args, kwargs, adapter_names)

    def _apply_adapter(self, adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        p = self.hyps_dropout.get(adapter, 0.0)
        if self._has_parallel(adapter) and adapter not in self.merged_adapters:
            a, b = self.hyps_A[adapter], self.hyps_B[adapter]
            xa = cast_input_dtype(self, x, a.dtype)
            if p > 0.0:
                xa = F.dropout(xa, p=p, training=self.training)
            # A B - A0 B0 = (A - A0) B + A0 (B - B0): one rank-2r pass over the tokens (the input is read once,
            # never the dense out x in update), and exactly zero while A == A0 and B == B0, since then every
            # product in it has an exactly-zero factor.
            a0, b0 = self.hyps_A0[adapter].to(a.dtype), self.hyps_B0[adapter].to(b.dtype)
            u = _linear(xa, torch.cat([b, b - b0]))  # (..., 2r)
            result = _add_matmul(result, u, torch.cat([a - a0, a0], dim=1))
        if self._has_serial(adapter):
            down, up = self.hyps_down[adapter], self.hyps_up[adapter]
            h = cast_input_dtype(self, result, down.weight.dtype)
            if p > 0.0:
                h = F.dropout(h, p=p, training=self.training)
            result = _add_matmul(result, F.relu(down(h)), up.weight, alpha=self.hyps_scale[adapter])
        return result

    def __repr__(self) -> str:
        return "hyps." + super().__repr__()


def _add_channel_mix(result: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``result + alpha * (weight mixes u's channels)`` for result (N, out, *S), u (N, k, *S), weight (out, k): a
    ``1x1x1`` convolution as a batched matmul over the flattened spatial positions, any number of spatial dims.

    One fused ``baddbmm`` pass when the dtypes agree; otherwise the mix is computed in the adapter's dtype and cast to
    the base output's dtype before the addition (as :func:`_add_matmul`)."""
    n, out = result.shape[:2]
    u3 = u.reshape(n, u.shape[1], -1)
    if result.dtype == u.dtype == weight.dtype:
        flat = torch.baddbmm(result.reshape(n, out, -1), weight.expand(n, *weight.shape), u3, alpha=alpha)
        return flat.view(result.shape)
    return result + (alpha * torch.bmm(weight.expand(n, *weight.shape), u3)).view(result.shape).to(result.dtype)


def _channel_mix(u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (c, k) applied to the channels of u (N, k, *S) -> (N, c, *S).

    An explicit ``bmm``, not ``torch.matmul``: matmul picks between a folded ``mm`` and a ``bmm`` by whether an operand
    requires grad, so a trainable adapter and the same adapter loaded for inference would run other kernels (other
    float32 rounding) on the same numbers."""
    n = u.shape[0]
    return torch.bmm(weight.expand(n, *weight.shape), u.reshape(n, u.shape[1], -1)).view(n, weight.shape[0],
                                                                                          *u.shape[2:])


_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class Conv(_HyPSModule):
    """HyPS around a convolution: ``nn.Conv1d/2d/3d`` or ``nn.ConvTranspose1d/2d/3d`` with ``groups=1`` (any stride,
    padding, padding mode, dilation, output padding, with or without bias).

    The kernel ``W`` is matricised as ``M = W.reshape(W.shape[0], -1)`` (see the module docstring) and the parallel
    branch is PiSSA on ``M``: ``M + A B - A0 B0``, ``A`` (rows x r), ``B`` (r x cols). The update is never materialised
    as a kernel in the forward; with ``A B - A0 B0 = (A - A0) B + A0 (B - B0)``:

    - convolution (rows = out, cols = in * prod(k)): ``u = conv(x, [B; B - B0])`` with the layer's own stride,
      padding and dilation (2r output channels), then the ``1x1x1`` mix ``[A - A0, A0] u``;
    - transposed convolution (rows = in, cols = out * prod(k)): the ``1x1x1`` mix ``z = [A - A0, A0]^T x`` (2r
      channels), then ``conv_transpose(z, [B; B - B0])`` with the layer's stride, padding, output padding, dilation.

    Every product has an exactly-zero factor while ``A == A0`` and ``B == B0``, so the adapter is an exact identity at
    initialisation. The serial branch acts on the output feature map's channels: ``h + scale * Up(ReLU(Down(h)))``
    with ``Down``/``Up`` ``1x1x1`` convolutions (out -> d -> out; ``Down`` rows mirrored as for the Linear). Adapter
    math runs in the adapter's dtype; the output is cast back to the base output's dtype.
    """

    def forward(self, x: torch.Tensor, *args: Any, adapter_names: Optional[list[str]] = None,
                **kwargs: Any) -> torch.Tensor:
        output_padding = self._transposed_output_padding(x, *args, **kwargs)
        return self._adapted_forward(x, args, kwargs, adapter_names, output_padding)

    def _transposed_output_padding(self, x: torch.Tensor,
                                   output_size: Optional[list[int]] = None) -> Optional[list[int]]:
        """A transposed convolution's output padding for this call (it depends on ``output_size=``), else None."""
        base = self.get_base_layer()
        if not base.transposed:
            return None
        return transposed_output_padding(base, x, output_size)

    def _apply_adapter(self, adapter: str, x: torch.Tensor, result: torch.Tensor,
                       output_padding: Optional[list[int]]) -> torch.Tensor:
        p = self.hyps_dropout.get(adapter, 0.0)
        if self._has_parallel(adapter) and adapter not in self.merged_adapters:
            base = self.get_base_layer()
            a, b = self.hyps_A[adapter], self.hyps_B[adapter]
            xa = cast_input_dtype(self, x, a.dtype)
            if p > 0.0:
                xa = F.dropout(xa, p=p, training=self.training)
            a0, b0 = self.hyps_A0[adapter].to(a.dtype), self.hyps_B0[adapter].to(b.dtype)
            kernel = torch.cat([b, b - b0]).view(2 * b.shape[0], *base.weight.shape[1:])  # (2r, *weight[0].shape)
            mix = torch.cat([a - a0, a0], dim=1)  # (rows, 2r)
            if base.transposed:
                z = _channel_mix(xa, mix.t())
                u = _CONV_TRANSPOSE[base.weight.dim() - 2](z, kernel, None, base.stride, base.padding, output_padding,
                                                           1, base.dilation)
                result = result + u.to(result.dtype)
            else:
                result = _add_channel_mix(result, conv_forward(base, xa, kernel, None), mix)
        if self._has_serial(adapter):
            down, up = self.hyps_down[adapter], self.hyps_up[adapter]
            h = cast_input_dtype(self, result, down.weight.dtype)
            if p > 0.0:
                h = F.dropout(h, p=p, training=self.training)
            z = F.relu(_channel_mix(h, down.weight.flatten(1)))
            result = _add_channel_mix(result, z, up.weight.flatten(1), alpha=self.hyps_scale[adapter])
        return result

    def __repr__(self) -> str:
        return "hyps." + super().__repr__()
