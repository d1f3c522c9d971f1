"""Training checkpoints: safetensors + JSON, never a pickle, and resume continues bit for bit."""

from __future__ import annotations

import json
import pickle
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open

from peft_tensor.training import Checkpointer
from peft_tensor.training.loop import poly_scheduler


def _setup(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    frozen = model[0].bias
    frozen.requires_grad_(False)  # a parameter without optimiser state
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, betas=(0.9, 0.99),
                            weight_decay=1e-3, amsgrad=True)
    return model, opt, poly_scheduler(opt, total_steps=10)


def _train(model, opt, sched, steps):
    for s in steps:
        g = torch.Generator().manual_seed(1000 + s)
        x, y = torch.randn(4, 5, generator=g), torch.randn(4, 2, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()


def _no_unpickling(monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("resume unpickled something")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)


def test_checkpoint_holds_no_pickle_and_resume_is_exact(tmp_path, monkeypatch):
    model, opt, sched = _setup(0)
    _train(model, opt, sched, range(3))
    ckpt = Checkpointer(tmp_path, every=3)
    extra = {"best_dice": 0.25, "history": [1, 2.5, None, True], "name": "run", "nested": {"a": [0.1]}}
    ckpt.save(3, model, opt, sched, extra=extra)
    rng_after_save = (torch.rand(3), np.random.rand(2), random.random())
    _train(model, opt, sched, range(3, 6))

    # a safetensors file whose header is its only non-tensor content: no pickle anywhere in the folder
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["checkpoint.safetensors"]
    raw = (tmp_path / files[0]).read_bytes()
    # safetensors layout: an 8-byte little-endian header length, then a JSON header, then raw tensor bytes (the first
    # byte is part of the length, so it may well be 0x80: that alone says nothing about pickle)
    n_header = int.from_bytes(raw[:8], "little")
    assert 0 < n_header < len(raw) and raw[8:9] == b"{"
    assert isinstance(json.loads(raw[8:8 + n_header]), dict)
    assert not raw.startswith(b"PK\x03\x04")  # not a torch.save zip archive
    with safe_open(str(tmp_path / files[0]), framework="pt") as fh:
        assert fh.metadata()["format"] == "peft_tensor.checkpoint"
        assert any(k.startswith("model/") for k in fh.keys()) and any(k.startswith("optimizer/") for k in fh.keys())

    # resume into a differently initialised model, optimiser and scheduler, with any unpickling made to fail
    resumed, opt2, sched2 = _setup(1)
    torch.manual_seed(99)
    with monkeypatch.context() as m:
        _no_unpickling(m)
        step, got_extra = Checkpointer(tmp_path).resume(resumed, opt2, sched2)
    assert step == 3 and got_extra == extra
    # the global RNGs continue where they were when the checkpoint was written
    assert torch.equal(torch.rand(3), rng_after_save[0])
    assert np.array_equal(np.random.rand(2), rng_after_save[1]) and random.random() == rng_after_save[2]
    assert opt2.param_groups[0]["betas"] == (0.9, 0.99)  # tuples stay tuples
    _train(resumed, opt2, sched2, range(3, 6))

    for (n, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n
    sa, sb = opt.state_dict(), opt2.state_dict()
    assert sa["param_groups"] == sb["param_groups"] and sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        for k in sa["state"][i]:
            assert torch.equal(sa["state"][i][k], sb["state"][i][k]), (i, k)
    assert sched.state_dict() == sched2.state_dict()


def test_nothing_to_resume(tmp_path):
    assert Checkpointer(tmp_path).resume(torch.nn.Linear(3, 2)) == (0, {})


def test_old_pickled_checkpoint_is_refused_not_unpickled(tmp_path, monkeypatch):
    torch.save({"step": 3, "model": torch.nn.Linear(3, 2).state_dict()}, tmp_path / "checkpoint.pt")
    _no_unpickling(monkeypatch)
    with pytest.raises(ValueError, match="pickle"):
        Checkpointer(tmp_path).resume(torch.nn.Linear(3, 2))


def test_extra_must_be_json(tmp_path):
    with pytest.raises(TypeError, match="object"):
        Checkpointer(tmp_path).save(1, torch.nn.Linear(3, 2), extra={"x": object()})
    assert not list(tmp_path.iterdir())
