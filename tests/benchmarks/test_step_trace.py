"""benchmarks/step_trace.py's per-step record (issue 22): the adapter group's gradient norm, its spike ratio, and
Adam's step relative to one that moves every entry by the learning rate, on a model with known answers."""

from __future__ import annotations

import pytest
import torch

from benchmarks.step_trace import StepTrace


def _model_and_optimizer(amsgrad: bool):
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 4)
    adapter = torch.nn.Linear(4, 4, bias=False)
    opt = torch.optim.Adam([{"params": list(head.parameters()), "lr": 1e-3},
                            {"params": list(adapter.parameters()), "lr": 0.5}], amsgrad=amsgrad)
    return head, adapter, opt


def _step(head, adapter, opt, scale: float) -> None:
    opt.zero_grad()
    x = torch.ones(2, 4)
    (scale * head(adapter(x)).sum()).backward()
    opt.step()


def test_first_step_moves_every_entry_by_the_rate_and_a_spike_stalls_amsgrad():
    head, adapter, opt = _model_and_optimizer(amsgrad=True)
    with StepTrace(method_lr=0.5) as tr:
        _step(head, adapter, opt, 1.0)
        _step(head, adapter, opt, 1.0)
        _step(head, adapter, opt, 1000.0)  # a spike
        for _ in range(60):
            _step(head, adapter, opt, 1.0)
    _step(head, adapter, opt, 1.0)  # after the context: not recorded
    rows = tr.rows
    assert len(rows) == 63
    assert rows[0]["lr"] == 0.5  # the adapter's group, not the head's
    assert rows[0]["step"] == pytest.approx(1.0, rel=1e-4)  # Adam's first step: every entry moves by lr
    assert rows[0]["spike"] == 1.0
    assert rows[2]["spike"] > 100  # the spike, against the median of the earlier norms
    # the spike's momentum carries the next steps; once it has decayed, AMSGrad's kept second moment stalls them
    assert max(r["step"] for r in rows[-20:]) < 0.1
    summary = tr.summary()
    assert summary["max_spike_step"] == 3 and summary["steps"] == 63
    assert summary["late_step"] < 0.1


def test_without_a_spike_the_steps_stay_near_the_rate():
    head, adapter, opt = _model_and_optimizer(amsgrad=True)
    with StepTrace(method_lr=0.5) as tr:
        for _ in range(6):
            _step(head, adapter, opt, 1.0)
    assert min(r["step"] for r in tr.rows) > 0.5
    assert max(r["spike"] for r in tr.rows) < 10
