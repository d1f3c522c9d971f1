"""Which weight matrices are stacked into which third-order tensor.

A *group* is a list of *slices*; each slice is a block of rows of one targeted ``nn.Linear`` weight
(``out x in``), and all slices of a group have the same shape ``n1 x n2``. Slice ``k`` of the group tensor is the
``k``-th entry of the list. The order matters (the FFT along the slice axis mixes neighbouring slices) and is
documented here:

* Convolutions (``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``, ``groups=1``) enter through a *matrix view* of
  their kernel (:func:`matrix_view`), chosen by ``conv_layout``:

  - ``"kernel"`` (default): the ``K = prod(kernel_size)`` kernel positions are the slices of one group per layer,
    each slice the ``weight[:, :, p]`` matrix (``out x in`` for a convolution, ``in x out`` for a transposed one, as
    stored), positions in row-major (C) order of the kernel. A 3x3x3 convolution is a ``27 x out x in`` tensor: the
    FFT runs along the kernel positions, and tCURLoRA trains ``r^2 K`` numbers per layer, independent of its width.
  - ``"stacked"``: the whole kernel flattened to ``out x (in K)`` (the im2col matrix, LoRA's view of a convolution)
    is one slice; same-shape kernels of several layers are stacked in module order like Linear weights.

  A 1x1x1 kernel (``K = 1``) is one ``out x in`` slice in either layout: it behaves as a Linear and is grouped with
  the Linear weights of its shape.
* ``grouping="by_shape"`` (any model): the matched modules' whole weights, grouped by shape, each group in module
  order (``model.named_modules()`` order). UNETR gives four groups of 12 (qkv kept fused).
* ``grouping="paper"`` (UNETR-style transformer blocks, as in the tCURLoRA/LoRA-PT papers): per block the fused qkv
  weight is split into its q, k, v row blocks and stacked with ``out_proj`` into the attention tensor, in the order
  ``slice_order`` (the authors use ``out_proj, q, k, v``) and block after block, so 4 slices per block; every
  block's ``mlp.linear1`` forms the MLP-up tensor and every ``mlp.linear2`` the MLP-down tensor. UNETR-B gives
  48 x 768 x 768, 12 x 3072 x 768 and 12 x 768 x 3072.

Under ``grouping="paper"`` the convolutions (which no paper role covers) are grouped as under ``"by_shape"``, after
the paper's groups. This module is model-free apart from reading module names, types and weight shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..errors import GroupingError
from ._targets import is_conv

__all__ = ["CONV_LAYOUTS", "SliceSpec", "GroupSpec", "plan_groups", "PAPER_ROLES", "DEFAULT_SLICE_ORDER",
           "from_matrix_view", "matrix_shape", "matrix_view"]

CONV_LAYOUTS = ("kernel", "stacked")

DEFAULT_SLICE_ORDER = ("out_proj", "q", "k", "v")
# module-name suffix -> role in a UNETR-style block
PAPER_ROLES = {"attn.qkv": "qkv", "attn.out_proj": "out_proj", "mlp.linear1": "linear1", "mlp.linear2": "linear2"}


@dataclass(frozen=True)
class SliceSpec:
    """Rows ``row_start:row_end`` of the weight of module ``module_name`` (``n1 = row_end - row_start``)."""

    module_name: str
    row_start: int
    row_end: int
    role: str = ""


@dataclass
class GroupSpec:
    """One group tensor ``L x n1 x n2`` and where its slices come from. ``rank`` is the group's rank once the tuner
    resolved it (``r``, ``rank_pattern``, ``rank_cap``: :mod:`._ranks`); ``requested_rank`` what was asked for
    before ``rank_cap`` lowered it."""

    name: str
    n1: int
    n2: int
    slices: list[SliceSpec] = field(default_factory=list)
    rank: Optional[int] = None
    requested_rank: Optional[int] = None

    @property
    def members(self) -> list[str]:
        """The module names of the slices, each once, in slice order."""
        return list(dict.fromkeys(s.module_name for s in self.slices))

    @property
    def n_slices(self) -> int:
        return len(self.slices)

    def slices_of(self, module_name: str) -> list[int]:
        """Slice indices that come from ``module_name``, in row order."""
        ids = [i for i, s in enumerate(self.slices) if s.module_name == module_name]
        return sorted(ids, key=lambda i: self.slices[i].row_start)

    def describe(self) -> dict:
        return {"name": self.name, "shape": [self.n_slices, self.n1, self.n2], "rank": self.rank,
                "slices": [f"{s.module_name}[{s.row_start}:{s.row_end}]" for s in self.slices]}


def _weight_shape(module: nn.Module) -> tuple[int, int]:
    out_f, in_f = module.weight.shape
    return int(out_f), int(in_f)


def _kernel_positions(module: nn.Module) -> int:
    return int(torch.Size(module.weight.shape[2:]).numel()) if is_conv(module) else 1


def matrix_shape(module: nn.Module, conv_layout: str = "kernel") -> tuple[int, int, int]:
    """``(n_slices, n1, n2)`` of the module's matrix view: its weight is ``n_slices`` row blocks of ``n1 x n2``."""
    if not is_conv(module):
        n1, n2 = _weight_shape(module)
        return 1, n1, n2
    a, b = (int(d) for d in module.weight.shape[:2])
    k = _kernel_positions(module)
    if conv_layout == "stacked":
        return 1, a, b * k
    return k, a, b


def matrix_view(weight: torch.Tensor, module: nn.Module, conv_layout: str = "kernel") -> torch.Tensor:
    """The weight as the matrix whose row blocks are the module's slices: a Linear's ``out x in`` weight itself; a
    convolution's ``(a, b, *kernel)`` kernel as ``(K a) x b`` (``"kernel"``: block ``p`` = ``weight[..., p]``) or
    ``a x (b K)`` (``"stacked"``). No copy for Linear weights and the stacked layout."""
    if not is_conv(module):
        return weight
    a, b = weight.shape[:2]
    if conv_layout == "stacked" or weight.dim() == 2 or weight.shape[2:].numel() == 1:
        return weight.reshape(a, -1)
    return weight.reshape(a, b, -1).permute(2, 0, 1).reshape(-1, b)


def from_matrix_view(matrix: torch.Tensor, module: nn.Module, conv_layout: str = "kernel") -> torch.Tensor:
    """Inverse of :func:`matrix_view`: a matrix-view tensor (e.g. an update) in the module's weight shape."""
    if not is_conv(module):
        return matrix
    shape = module.weight.shape
    a, b = shape[:2]
    if conv_layout == "stacked" or shape[2:].numel() == 1:
        return matrix.reshape(shape)
    return matrix.reshape(-1, a, b).permute(1, 2, 0).reshape(shape)


def _by_shape(targets: list[tuple[str, nn.Module]], conv_layout: str = "kernel") -> list[GroupSpec]:
    groups: dict[object, GroupSpec] = {}
    for name, module in targets:
        n_slices, n1, n2 = matrix_shape(module, conv_layout)
        if n_slices > 1:  # a convolution's kernel positions: one group of its own
            spec = GroupSpec(name=f"kernel_{name}", n1=n1, n2=n2)
            spec.slices += [SliceSpec(name, p * n1, (p + 1) * n1, role=f"position{p}") for p in range(n_slices)]
            groups[("kernel", name)] = spec
            continue
        spec = groups.setdefault((n1, n2), GroupSpec(name=f"shape_{n1}x{n2}", n1=n1, n2=n2))
        spec.slices.append(SliceSpec(name, 0, n1, role="weight"))
    return list(groups.values())


def _paper(targets: list[tuple[str, nn.Module]], slice_order: tuple[str, ...]) -> list[GroupSpec]:
    hint = (
        "grouping='paper' expects UNETR-style transformer blocks whose Linear layers are named "
        "'<block>.attn.qkv', '<block>.attn.out_proj', '<block>.mlp.linear1', '<block>.mlp.linear2'. "
        "Use grouping='by_shape' for other models."
    )
    blocks: dict[str, dict[str, tuple[str, nn.Module]]] = {}
    for name, module in targets:
        for suffix, role in PAPER_ROLES.items():
            if name == suffix or name.endswith("." + suffix):
                block = name[: -len(suffix)].rstrip(".")
                blocks.setdefault(block, {})[role] = (name, module)
                break
        else:
            raise GroupingError(f"Module {name!r} does not fit the paper grouping. {hint}")

    role_sets = {block: frozenset(roles) for block, roles in blocks.items()}
    reference = next(iter(role_sets.values()))
    for block, roles in role_sets.items():
        if roles != reference:
            raise GroupingError(
                f"Block {block!r} has targeted layers {sorted(roles)} but other blocks have {sorted(reference)}; "
                f"every block must contribute the same layers. {hint}"
            )

    groups: list[GroupSpec] = []
    attn_roles = [r for r in slice_order if r in ("out_proj", "q", "k", "v")]
    if sorted(slice_order) != sorted(DEFAULT_SLICE_ORDER):
        raise GroupingError(
            f"slice_order must be a permutation of {list(DEFAULT_SLICE_ORDER)}, got {list(slice_order)}.")
    if "qkv" in reference or "out_proj" in reference:
        attn: GroupSpec | None = None
        for block, roles in blocks.items():
            pieces: dict[str, SliceSpec] = {}
            if "qkv" in roles:
                name, module = roles["qkv"]
                out_f, in_f = _weight_shape(module)
                if out_f != 3 * in_f:
                    raise GroupingError(
                        f"{name!r} has a {out_f} x {in_f} weight, not the fused 3*d x d qkv projection the paper "
                        f"grouping splits into q, k, v. {hint}"
                    )
                for j, role in enumerate(("q", "k", "v")):
                    pieces[role] = SliceSpec(name, j * in_f, (j + 1) * in_f, role=role)
            if "out_proj" in roles:
                name, module = roles["out_proj"]
                out_f, _ = _weight_shape(module)
                pieces["out_proj"] = SliceSpec(name, 0, out_f, role="out_proj")
            for role in attn_roles:
                if role not in pieces:
                    continue
                piece = pieces[role]
                module = dict(targets)[piece.module_name]
                n1, n2 = piece.row_end - piece.row_start, _weight_shape(module)[1]
                if attn is None:
                    attn = GroupSpec(name="attention", n1=n1, n2=n2)
                if (n1, n2) != (attn.n1, attn.n2):
                    raise GroupingError(
                        f"{piece.module_name!r} gives a {n1} x {n2} slice but the attention tensor has "
                        f"{attn.n1} x {attn.n2} slices. {hint}"
                    )
                attn.slices.append(piece)
        groups.append(attn)
    for role, gname in (("linear1", "mlp_up"), ("linear2", "mlp_down")):
        if role not in reference:
            continue
        spec: GroupSpec | None = None
        for block, roles in blocks.items():
            name, module = roles[role]
            n1, n2 = _weight_shape(module)
            if spec is None:
                spec = GroupSpec(name=gname, n1=n1, n2=n2)
            if (n1, n2) != (spec.n1, spec.n2):
                raise GroupingError(
                    f"{name!r} is {n1} x {n2} but other {role} layers are {spec.n1} x {spec.n2}. {hint}")
            spec.slices.append(SliceSpec(name, 0, n1, role=role))
        groups.append(spec)
    return groups


def plan_groups(targets: list[tuple[str, nn.Module]], grouping: str,
                slice_order=DEFAULT_SLICE_ORDER, conv_layout: str = "kernel") -> list[GroupSpec]:
    """Plan the group tensors for the matched ``(name, layer)`` targets (``nn.Linear`` and convolutions, in module
    order)."""
    if conv_layout not in CONV_LAYOUTS:
        raise GroupingError(f"conv_layout must be one of {list(CONV_LAYOUTS)}, got {conv_layout!r}.")
    if grouping == "by_shape":
        return _by_shape(targets, conv_layout)
    if grouping == "paper":
        linears = [(n, m) for n, m in targets if not is_conv(m)]
        convs = [(n, m) for n, m in targets if is_conv(m)]
        return (_paper(linears, tuple(slice_order)) if linears else []) + _by_shape(convs, conv_layout)
    raise GroupingError(f"grouping must be 'by_shape' or 'paper', got {grouping!r}.")

