"""Machinery shared by the cross-layer tensor methods (tCURLoRA, LoRA-PT).

Both methods adapt a *group* of weight slices ``W_k`` (see :mod:`..grouping`) by a tensor update that is a
t-product of two thin factors,

    W'_k = W_k + D_k,    D = A * B,    A: (L, n1, q),  B: (L, q, n2),

(a sum of such terms in general) where only the method decides what ``A`` and ``B`` are (tCURLoRA: ``A = C``,
``B = (U - U0) * R``; LoRA-PT: ``U * (S * V^T)`` plus the frozen ``U0 * (-(S0 * V0^T))``). Everything else lives
here, once, one role per file:

* :mod:`.state` -- :class:`TensorGroup`, one group's state (an ``nn.Module`` on the tuner, so it exists once per
  adapter and is saved once), its state dict and its per-forward cache; :class:`SliceAssignment`,
  :class:`ForwardScope`, :func:`cache_build`. Its factors are computed **once per forward pass of the model** and
  cached; the cache key holds the version counters of its tensors and a forward counter, so it is never stale (after
  an optimiser step, under ``no_grad``, with gradient accumulation, after load, merge or unmerge).
* :mod:`.autograd` -- :class:`_Factors`, the factors as one autograd node that saves no tensors.
* :mod:`.layer` -- :class:`TensorGroupLayer`, the wrapped ``nn.Linear`` or convolution. It adds ``D_k x`` without
  ever materialising ``D``: ``D_k x = sum_a A_a (B_{(k-a) mod L} x)``, i.e. one ``(N, n2) @ (n2, L q)`` product
  shared by all of the layer's slices and one ``(N, L q) @ (L q, n1)`` product per slice. Merging materialises ``D``
  through the FFT. (Materialising ``D`` every step instead was measured ~10x slower on CPU: a 28 M-entry FFT and its
  gradient.) A convolution's slices are its kernel's matrix view (:func:`..grouping.matrix_view`); it runs
  ``conv(x, W + D)`` with its kernel-sized ``D`` from the FFT, once per forward: a kernel is small next to a 3D
  activation, so the dense kernel is the cheap way there (measured in ``benchmarks/efficiency.py``, ``conv_delta``
  section). One routing function (``TensorGroupLayer._route``) picks the path of a call: convolution, mixed batch,
  dense or factored.
* :mod:`.tuner` -- :class:`TensorGroupTuner`, the ``BaseTuner``: finds and validates targets *before* touching the
  model, plans the groups, wraps the layers, builds the groups, keeps trainable flags and the forward counter in
  sync, and maps state-dict keys so adapters save and load under any adapter name.

Precision: factors, ``D`` and merges are computed in float32 whatever the model's dtype (half-precision weights get
one correctly rounded result), and in float64 for a float64 model (``algebra.compute_dtype``); "float32" in the
docstrings means that compute dtype.

Every name is re-exported here, at the path it had when this was one module (``peft_tensor.tuners.tensor_group``);
the private ones too, for the tests and tools that reach them. Code that patches a name must patch the submodule
that looks it up (e.g. ``tensor_group.tuner._inside_init_empty_weights``).
"""

from __future__ import annotations

from .autograd import _Factors as _Factors
from .layer import TensorGroupLayer
from .state import ForwardScope, SliceAssignment, TensorGroup, cache_build
from .state import _device_of as _device_of
from .state import _incomplete_message as _incomplete_message
from .state import _refuse_incomplete_adapter_load as _refuse_incomplete_adapter_load
from .state import _to_device as _to_device
from .tuner import TensorGroupTuner
from .tuner import _inside_init_empty_weights as _inside_init_empty_weights

__all__ = ["cache_build", "ForwardScope", "TensorGroup", "TensorGroupLayer", "TensorGroupTuner", "SliceAssignment"]
