"""The gradient diagnostics of benchmarks/conditioning.py (issue 22): the fraction of a weight gradient each adapter's
update space holds, and the descent cosine of Adam's first step, on constructed gradients with known answers."""

from __future__ import annotations

import torch

from benchmarks.conditioning import _first_step_cosines, _tangent_fractions
from peft_tensor.algebra import from_fourier, tensor_cur, to_fourier


def _weights(seed: int = 0, shape=(4, 12, 10)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def test_gradient_inside_the_cur_space_is_held_whole_and_fractions_are_ordered():
    w = _weights()
    cur = tensor_cur(w, 3)
    x = _weights(1, (4, 3, 3))
    g = from_fourier(to_fourier(cur.C) @ to_fourier(x) @ to_fourier(cur.R), 4)  # a step the r=3 core can take
    out = _tangent_fractions(w, g, ranks=(3, 5), lorapt_r=2, gen=torch.Generator().manual_seed(0))
    assert abs(out["tcur r=3"] - 1.0) < 1e-9  # all of it
    assert out["best r=5"] >= out["best r=3"] - 1e-12
    assert abs(out["best r=3"] - 1.0) < 1e-9  # and no subspace pair of that size does better
    for key, value in out.items():
        assert -1e-12 <= value <= 1 + 1e-9, key


def test_random_gradient_fractions_match_the_spaces_dimensions():
    n_slices, n1, n2 = 6, 40, 32
    w = _weights(2, (n_slices, n1, n2))
    g = _weights(3, (n_slices, n1, n2))
    out = _tangent_fractions(w, g, ranks=(4,), lorapt_r=4, gen=torch.Generator().manual_seed(1))
    # an isotropic gradient: each space holds about its share of the dimensions
    assert abs(out["lora r=8"] - 8 / n2) < 0.05  # B trains: the rows of A, 8 of n2 input directions
    assert abs(out["tcur r=4"] - (4 / n1) * (4 / n2)) < 0.01
    expected_pt = 4 / n1 + 4 / n2 - (4 / n1) * (4 / n2)  # U X + Y V^T
    assert abs(out["lorapt r=4"] - expected_pt) < 0.05
    assert out["best r=4"] > out["tcur r=4"]


def test_first_step_cosines_are_one_when_the_gradient_is_a_sign_pattern_of_the_core():
    # G = -C * sign-pattern * R in the orthonormal coordinates: Adam's first step there is the steepest descent
    w = _weights(4, (1, 8, 8))  # one slice: the t-product is a matrix product
    gen = torch.Generator().manual_seed(0)
    out = _first_step_cosines(w, _weights(5, (1, 8, 8)), 3, gen)
    assert set(out) == {"tcur paper r=3", "tcur orthonormal r=3", "tcur fourier r=3", "lora r=8 (dB)"}
    for value in out.values():
        assert 0.0 < value <= 1.0 + 1e-9  # a sign step against the gradient always descends

    from peft_tensor.algebra import t_qr_whiteners
    cur = tensor_cur(w, 3)
    wc, wr = t_qr_whiteners(cur.C, cur.R)
    qc, qr = cur.C @ wc, wr @ cur.R  # orthonormal columns / rows (L=1)
    signs = torch.tensor([[1.0, -1.0, 1.0], [-1.0, -1.0, 1.0], [1.0, 1.0, -1.0]], dtype=torch.float64)
    g = (qc[0] @ signs @ qr[0])[None]
    out = _first_step_cosines(w, g, 3, gen)
    assert abs(out["tcur orthonormal r=3"] - 1.0) < 1e-9
