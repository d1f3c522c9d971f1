"""The embedded ``target_shift`` task: the hippocampus subjects under an acquisition shift from the pretraining T1
(T2-like contrast, thick slices, stronger bias field, Rician noise), reproducible and selectable from a recipe
config."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from peft_tensor.data import load_dataset
from peft_tensor.data.embedded import AcquisitionShift, CohortSpec, make_subject
from peft_tensor.data.io import read_nifti
from peft_tensor.training import load_config
from tests._optional import needs_template  # skipped locally without the template packages, a failure in CI

SMALL = {"n_train": 1, "n_val": 0, "n_test": 0, "progress": False}


def _volumes(ds) -> dict:
    return {c["id"]: (read_nifti(c["image"])[0], read_nifti(c["label"])[0]) for c in ds["train"]}


def _inside(image: np.ndarray) -> np.ndarray:  # brain voxels away from the brain's edge
    return gaussian_filter((image > 0).astype(float), 2) > 0.999


def _corr(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    return float(np.corrcoef(a[mask], b[mask])[0, 1])


@needs_template
def test_selectable_from_a_recipe_config_and_reproducible(tmp_path):
    over = ["data.task=target_shift", "data.n_train=1", "data.n_val=0", "data.n_test=0", "data.progress=false"]
    cfg = load_config("finetune_cpu", [*over, f"data.cache_dir={tmp_path / 'a'}"])
    ds = load_dataset(cfg["data"])
    assert ds.task.kind == "binary" and ds.task.classes == ("hippocampus",)
    assert [c["id"] for c in ds["train"]] == ["train_000_L", "train_000_R"]
    meta = json.loads((Path(ds.extra["folder"]) / "cohort.json").read_text())
    assert meta["spec"]["shift"] == asdict(AcquisitionShift()) and meta["splits"]["source"] == []

    # same seed, fresh cache: bit-identical volumes; another cohort seed: other volumes
    again = load_dataset(load_config("finetune_cpu", [*over, f"data.cache_dir={tmp_path / 'b'}"])["data"])
    first, second = _volumes(ds), _volumes(again)
    for cid in first:
        assert np.array_equal(first[cid][0], second[cid][0]) and np.array_equal(first[cid][1], second[cid][1])
    other = _volumes(load_dataset({"kind": "embedded", "task": "target_shift", "seed": 1, **SMALL,
                                   "cache_dir": str(tmp_path / "a")}))
    assert not np.array_equal(other["train_000_L"][0], first["train_000_L"][0])

    # the unshifted target task: the same subjects (labels identical), in another cache folder
    target = load_dataset({"kind": "embedded", "task": "target", "n_source": 0, **SMALL,
                           "cache_dir": str(tmp_path / "a")})
    assert target.extra["folder"] != ds.extra["folder"]
    t1 = _volumes(target)
    for cid, (image, label) in first.items():
        assert np.array_equal(label, t1[cid][1])
        # the tissue ordering is reversed: the fine structure (image minus its smooth part, which the bias field
        # lives in) is anti-correlated with the T1's
        a, b = t1[cid][0], image
        assert _corr(a - gaussian_filter(a, 3), b - gaussian_filter(b, 3), _inside(a)) < -0.4

    # a design set from the config: data.shift overrides fields of AcquisitionShift
    flair = load_dataset(load_config("finetune_cpu", [*over, f"data.cache_dir={tmp_path / 'a'}",
                                                      "data.shift.contrast=flair"])["data"])
    assert json.loads((Path(flair.extra["folder"]) / "cohort.json").read_text())["spec"]["shift"]["contrast"] \
        == "flair"


@needs_template
def test_each_part_of_the_shift_changes_the_image_as_stated():
    spec = CohortSpec()

    def shifted(**kw):
        return make_subject(replace(spec, shift=asdict(AcquisitionShift(**kw))), "train", 0, "L")[0]

    t1 = make_subject(spec, "train", 0, "L")[0]
    inside = _inside(t1)
    # the contrast alone (no slices, no bias, no noise): T2-like, strongly anti-correlated with the T1 contrast
    # (contrast "t1": the identity remapping, i.e. the pretraining cohort without its bias field and noise)
    contrast = shifted(slice_mm=None, bias_coeff=0.0, rician_std=0.0)
    same = shifted(contrast="t1", slice_mm=None, bias_coeff=0.0, rician_std=0.0)
    assert _corr(same, t1, inside) > 0.7 and _corr(same, contrast, inside) < -0.8

    # thick slices along axis 2: less detail (squared differences of neighbours inside the brain) along that axis
    # than in-plane, unlike the isotropic T1
    def detail(x, axis):
        d = np.diff(x, axis=axis) ** 2
        keep = inside[tuple(slice(0, -1) if a == axis else slice(None) for a in range(3))]
        return float(d[keep].mean())

    def detail_ratio(x):
        return detail(x, 2) / detail(x, 0)

    thick = shifted(bias_coeff=0.0, rician_std=0.0)
    assert detail_ratio(thick) < 0.5 * detail_ratio(contrast)
    assert 0.6 < detail_ratio(contrast) / detail_ratio(shifted(slice_mm=None, slice_axis=0, bias_coeff=0.0,
                                                                rician_std=0.0)) < 1.6


def test_wrong_task_or_shift_says_what_to_set(tmp_path):
    with pytest.raises(ValueError, match="data.task must be one of source, target, target_shift"):
        load_dataset({"kind": "embedded", "task": "shifted", "cache_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="set data.task=target_shift or remove data.shift"):
        load_dataset({"kind": "embedded", "task": "target", "shift": {"contrast": "t2"}, "cache_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="data.shift.contrast must be one of t1, t2, flair"):
        load_dataset({"kind": "embedded", "task": "target_shift", "shift": {"contrast": "pd"},
                      "cache_dir": str(tmp_path)})
    with pytest.raises(ValueError, match=r"unknown data.shift keys \['slices'\]"):
        AcquisitionShift.from_config({"slices": 3})
    assert CohortSpec().key() == "cc2920a5b5"  # the T1 cohort keeps its cache folder (built before shifts)
