"""Data: the embedded template-derived cohort, loaders on NIfTI fixtures, deterministic batches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from peft_tensor.data import brats2021, load_cases, load_dataset, msd_hippocampus, pairs_folder, sample_batch
from tests._optional import needs_template  # skipped locally without the template packages, a failure in CI
from tests._recipe_fixtures import brats_dataset, msd_dataset, pairs_dataset


@needs_template
def test_embedded_cohort_is_deterministic_cached_and_has_both_tasks(tmp_path):
    from peft_tensor.data.embedded import CohortSpec, build_cohort, make_subject

    spec = CohortSpec(seed=3, size=16, spacing=3.0)
    folder = build_cohort(n_source=1, n_train=1, n_val=0, n_test=1, spec=spec, cache_dir=tmp_path)
    meta = json.loads((folder / "cohort.json").read_text())
    assert meta["splits"] == {"source": ["source_000_L", "source_000_R"], "train": ["train_000_L", "train_000_R"],
                              "val": [], "test": ["test_000_L", "test_000_R"]}
    assert "NOT patient data" in meta["description"]
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary files left behind
    img_path = folder / "train_000_L_img.nii.gz"
    mtime = img_path.stat().st_mtime_ns
    build_cohort(n_source=1, n_train=1, n_val=0, n_test=1, spec=spec, cache_dir=tmp_path)
    assert img_path.stat().st_mtime_ns == mtime  # reused, not regenerated

    a = make_subject(spec, "train", 0, "L")
    b = make_subject(spec, "train", 0, "L")
    c = make_subject(spec, "train", 1, "L")
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert a[0].shape == (16, 16, 16)
    codes = set(np.unique(a[1]).tolist())
    assert 17 in codes and 53 not in codes and len(codes & {10, 11, 12, 13, 18}) >= 3  # left-hemisphere box
    assert 53 in set(np.unique(make_subject(spec, "train", 0, "R")[1]).tolist())

    target = load_dataset({"kind": "embedded", "task": "target", "n_source": 1, "n_train": 1, "n_val": 0,
                           "n_test": 1, "cache_dir": str(tmp_path), "seed": 3, "size": 16, "spacing": 3.0})
    source = load_dataset({"kind": "embedded", "task": "source", "n_source": 1, "n_train": 1, "n_val": 0,
                           "n_test": 1, "cache_dir": str(tmp_path), "seed": 3, "size": 16, "spacing": 3.0})
    t, _ = load_cases(target["train"], target.foreground)
    s, _ = load_cases(source["train"], source.foreground)
    s_hippo, _ = load_cases(source["train"], target.foreground)  # the same subject seen by the target task
    assert t.label.sum() > 0 and s.label.sum() > 0 and s_hippo.label.sum() > 0
    assert not (s_hippo.label.bool() & s.label.bool()).any()  # source structures exclude the hippocampus
    assert t.spacing == pytest.approx((3.0, 3.0, 3.0))


def test_pairs_folder_splits_json_text_and_random(tmp_path):
    root = pairs_dataset(tmp_path / "pairs", n=5)
    ds = pairs_folder(root, foreground=(17,))
    assert [len(ds[s]) for s in ("train", "val", "test")] == [3, 1, 1]
    (root / "few.txt").write_text("case01\ncase03\n")
    assert [c["id"] for c in pairs_folder(root, split_files="few.txt")["few"]] == ["case01", "case03"]
    (root / "splits.json").unlink()
    rnd = pairs_folder(root, fractions={"train": 0.6, "test": 0.4}, seed=1)
    assert sorted(c["id"] for s in ("train", "test") for c in rnd[s]) == [f"case{i:02d}" for i in range(5)]
    (case,) = load_cases(ds["val"], ds.foreground)
    both = load_cases(ds["val"], ())[0]
    assert set(torch.unique(case.label).tolist()) == {0, 1}
    assert 0 < case.label.sum() < both.label.sum()  # only code 17 vs every non-zero code
    with pytest.raises(FileNotFoundError):
        (root / "bad.txt").write_text("case99\n")
        pairs_folder(root, split_files="bad.txt")


def test_msd_and_brats_layouts(tmp_path):
    msd = msd_hippocampus(msd_dataset(tmp_path / "Task04_Hippocampus", n=5), fractions={"train": 0.6, "test": 0.4})
    assert msd.foreground == (1, 2) and len(msd["train"]) == 3 and len(msd["test"]) == 2
    case = load_cases(msd["test"][:1], msd.foreground)[0]
    assert set(torch.unique(case.label).tolist()) == {0, 1}

    brats = brats2021(brats_dataset(tmp_path / "brats", n=3), fractions={"train": 0.67, "test": 0.33})
    assert brats.foreground == (1, 2, 4)
    items = brats["train"] + brats["test"]
    assert all(i["image"].endswith("_flair.nii.gz") for i in items)
    import nibabel as nib

    raw = np.asarray(nib.load(items[0]["label"]).dataobj)
    case = load_cases(items[:1], brats.foreground)[0]
    assert int(case.label.sum()) == int((np.isin(raw, (1, 2, 4))).sum())  # whole tumour = 1 | 2 | 4


def test_batches_are_a_function_of_step_and_split_across_ranks(tmp_path):
    ds = pairs_folder(pairs_dataset(tmp_path / "pairs", n=4), foreground=(17, 53))
    cases = load_cases(ds["train"], ds.foreground)
    x, y = sample_batch(cases, step=5, global_batch=4, seed=0, patch=(16, 16, 16))
    x2, y2 = sample_batch(cases, step=5, global_batch=4, seed=0, patch=(16, 16, 16))
    assert x.shape == (4, 1, 16, 16, 16) and torch.equal(x, x2) and torch.equal(y, y2)
    parts = [sample_batch(cases, 5, 4, 0, (16, 16, 16), rank=r, world_size=2) for r in range(2)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    assert not torch.equal(sample_batch(cases, 6, 4, 0, (16, 16, 16))[0], x)
