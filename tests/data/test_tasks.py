"""Multi-class and multi-label tasks, configurable preprocessing, the dataset classes and DataLoader workers, a user's
loader by dotted path, and the errors a user meets first (tiny NIfTI fixtures written here)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from peft_tensor.data import CaseSource, LoaderSettings, load_cases, load_dataset, make_task, msd, sample_batch
from peft_tensor.data.datasets import train_loader
from peft_tensor.data.labels import BRATS_REGIONS
from peft_tensor.data.transforms import Preprocess, augmentation
from peft_tensor.training import (check_output_channels, make_loss, model_config_for_task, summarize,
                                  summarize_per_class, task_case_metrics)
from tests._recipe_fixtures import blob_volume, brats_dataset, msd_dataset, pairs_dataset, write_nifti


def test_label_tasks_encode_and_check():
    raw = torch.tensor([0, 1, 2, 4, 3], dtype=torch.float32).reshape(1, 5, 1, 1)
    mc = make_task("multiclass", {"a": 1, "b": [2, 3]})
    assert mc.out_channels == 3 and mc.label_channels == 1 and mc.softmax
    assert mc.encode(raw).flatten().tolist() == [0, 1, 2, 0, 2]
    assert mc.masks(mc.encode(raw)).shape == (2, 5, 1, 1)

    ml = make_task("multilabel", BRATS_REGIONS)
    assert ml.out_channels == 3 and not ml.softmax
    from monai.transforms import ConvertToMultiChannelBasedOnBratsClasses

    assert torch.equal(ml.encode(raw).bool(), torch.as_tensor(ConvertToMultiChannelBasedOnBratsClasses()(raw)))

    binary = make_task("binary", foreground=(2, 3))
    assert binary.out_channels == 2 and binary.encode(raw).flatten().tolist() == [0, 0, 1, 0, 1]
    assert make_task("binary").encode(raw).flatten().tolist() == [0, 1, 1, 1, 1]  # every non-zero code
    with pytest.raises(ValueError, match="exclusive"):
        make_task("multiclass", {"a": [1, 2], "b": [2]})
    with pytest.raises(ValueError, match="needs data.classes"):
        make_task("multilabel")
    with pytest.raises(ValueError, match="task_type must be one of"):
        make_task("softmax", {"a": 1})


def test_msd_classes_from_dataset_json_and_the_binary_special_case(tmp_path):
    root = msd_dataset(tmp_path / "Task04_Hippocampus", n=5)
    ds = msd(root, fractions={"train": 0.6, "test": 0.4})
    assert ds.task.kind == "multiclass" and ds.task.classes == ("anterior", "posterior")
    assert ds.task.out_channels == 3 and len(ds["train"]) == 3
    case = load_cases(ds["test"][:1], ds.task)[0]
    assert set(torch.unique(case.label).tolist()) == {0, 1, 2} and case.label.shape[0] == 1

    binary = load_dataset({"kind": "msd", "root": str(root), "task_type": "binary"})
    assert binary.task.kind == "binary" and binary.task.codes == ((1, 2),) and binary.task.classes == ("hippocampus",)
    one = load_dataset({"kind": "msd", "root": str(root), "classes": ["posterior"], "split_files": None})
    assert one.task.classes == ("posterior",) and one.task.codes == ((2,),)  # split_files: null (pairs' key) ignored
    with pytest.raises(TypeError, match=r"data.kind=msd does not take \['split_files'\]; its arguments"):
        load_dataset({"kind": "msd", "root": str(root), "split_files": ["splits.json"]})

    brats = load_dataset({"kind": "brats", "root": str(brats_dataset(tmp_path / "brats", n=2)),
                          "task_type": "multilabel", "modality": ["flair", "t1"]})
    assert brats.task.classes == tuple(BRATS_REGIONS) and brats.task.out_channels == 3
    case = load_cases(brats["train"][:1], brats.task)[0]
    assert case.image.shape[0] == 2 and case.label.shape[0] == 3  # two modalities in, three regions out
    assert torch.equal(case.label[0].bool() & ~case.label[1].bool(), torch.zeros_like(case.label[0].bool()))


def test_per_class_metrics_and_losses():
    truth = np.zeros((2, 20, 20, 20), bool)
    truth[0, 2:8, 2:8, 2:8] = True
    truth[1, 10:16, 10:16, 10:16] = True
    pred = truth.copy()
    pred[1, 10:13] = False  # class b: half its voxels missed
    row = task_case_metrics(pred, truth, ("a", "b"), spacing=(1.0, 1.0, 1.0))
    assert row["dice:a"] == pytest.approx(1.0) and row["dice:b"] == pytest.approx(2 * 108 / (108 + 216))
    assert row["dice"] == pytest.approx((row["dice:a"] + row["dice:b"]) / 2)
    assert row["fg_volume_ml"] == pytest.approx((216 + 108) / 1000)
    per = summarize_per_class([row, row], ("a", "b"))
    assert per["b"]["dice"]["mean"] == pytest.approx(row["dice:b"]) and per["a"]["dice"]["n"] == 2
    assert summarize([row])["dice"]["mean"] == pytest.approx(row["dice"])
    single = task_case_metrics(pred[:1], truth[:1], ("a",))
    assert "dice:a" not in single and summarize_per_class([single], ("a",))["a"]["dice"]["mean"] == 1.0

    logits = torch.randn(2, 3, 8, 8, 8)
    assert make_loss("dicece", make_task("multiclass", {"a": 1, "b": 2}))(
        logits, torch.randint(0, 3, (2, 1, 8, 8, 8))).item() > 0
    assert make_loss("dice", make_task("multilabel", BRATS_REGIONS))(
        logits, torch.randint(0, 2, (2, 3, 8, 8, 8)).float()).item() > 0


def test_out_channels_must_match_the_task():
    task = make_task("multiclass", {"anterior": 1, "posterior": 2})
    assert model_config_for_task({"name": "unetr"}, task)["out_channels"] == 3  # filled in when absent
    with pytest.raises(ValueError, match=r"model.out_channels is 2, but .*needs 3 \(background \+ 2 classes\).*"
                                         r"model.out_channels=3"):
        model_config_for_task({"name": "unetr", "out_channels": 2}, task)
    from tests._models import tiny_unetr

    with pytest.raises(ValueError, match="the network has 2 output channels"):
        check_output_channels(tiny_unetr(), task)
    check_output_channels(tiny_unetr(), make_task("binary", foreground=(1,)))


def test_dataset_classes_and_workers_give_the_same_samples(tmp_path):
    root = pairs_dataset(tmp_path / "pairs", n=4)
    ds = load_dataset({"kind": "pairs", "root": str(root), "task_type": "multiclass",
                       "classes": {"left": 17, "right": 53}})
    items, patch = ds["train"], (16, 16, 16)
    in_memory = load_cases(items, ds.task, min_size=patch)
    sources = {kind: CaseSource(items, ds.task, None, patch, dataset=kind, cache_dir=tmp_path / "pc")
               for kind in ("cache", "persistent", "dataset")}
    sources["half"] = CaseSource(items, ds.task, None, patch, dataset="cache", cache_rate=0.5)
    for src in sources.values():
        for a, b in zip(in_memory, src):
            assert a.id == b.id and torch.equal(a.image, b.image) and torch.equal(a.label, b.label)
            assert a.spacing == pytest.approx(b.spacing)
    cached = sorted((tmp_path / "pc").glob("*.pt"))
    assert len(cached) == len(items)
    again = CaseSource(items, ds.task, None, patch, dataset="persistent", cache_dir=tmp_path / "pc")
    assert torch.equal(again[0].image, in_memory[0].image)  # read back with torch.load(weights_only=True)
    CaseSource(items, ds.task, {"intensity": "zscore"}, patch, dataset="persistent", cache_dir=tmp_path / "pc")[0]
    assert len(list((tmp_path / "pc").glob("*.pt"))) == len(items) + 1  # other preprocessing, other cache file

    aug = augmentation(patch)
    want = [sample_batch(in_memory, step, 4, 0, patch, rank=1, world_size=2, aug=aug) for step in (2, 3, 4)]
    for workers, kind in ((0, "dataset"), (2, "persistent")):
        loader = train_loader(sources[kind], 0, 4, aug, start=2, steps=5, rank=1, world_size=2,
                              settings=LoaderSettings(num_workers=workers))
        got = list(loader)
        assert len(got) == 3
        for (x, y), (gx, gy) in zip(want, got):
            assert torch.equal(x, gx) and torch.equal(y, gy) and gy.dtype == torch.long
    with pytest.raises(ValueError, match="data.loader.dataset must be one of"):
        LoaderSettings.from_config({"loader": {"dataset": "memory"}})
    with pytest.raises(ValueError, match="unknown data.loader keys"):
        LoaderSettings.from_config({"loader": {"workers": 2}})


def test_preprocessing_is_configurable(tmp_path):
    img, lab = blob_volume(1, size=20, codes=(1,))
    write_nifti(tmp_path / "ct_img.nii.gz", img * 400 - 200, spacing=2.0)
    write_nifti(tmp_path / "ct_mask.nii.gz", lab)
    item = {"image": str(tmp_path / "ct_img.nii.gz"), "label": str(tmp_path / "ct_mask.nii.gz"), "id": "ct"}
    task = make_task("binary")
    pre = Preprocess(spacing=4.0, intensity="window", window=[-100, 300], orientation="LPS")
    (case,) = load_cases([item], task, preprocess=pre)
    assert case.image.shape[1:] == (10, 10, 10) and case.spacing == pytest.approx((4.0, 4.0, 4.0))
    assert float(case.image.min()) == 0.0 and float(case.image.max()) <= 1.0
    assert case.affine[0, 0] < 0  # LPS: the first axis runs right -> left
    (cropped,) = load_cases([item], task, preprocess={"crop_foreground": True})
    assert all(s < 20 for s in cropped.image.shape[1:])  # the empty border is gone
    assert Preprocess.from_config({"spacing_mm": 1.5}).spacing == [1.5, 1.5, 1.5]  # the older key
    with pytest.raises(ValueError, match="needs data.preprocess.window"):
        Preprocess(intensity="window")
    with pytest.raises(ValueError, match="unknown data.preprocess keys"):
        Preprocess.from_config({"preprocess": {"spaceing": 1.0}})


def test_user_loader_by_dotted_path_and_missing_files(tmp_path):
    root = pairs_dataset(tmp_path / "mine", n=3)
    with open(root / "cases.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "split"])
        for i, split in enumerate(("train", "train", "test")):
            w.writerow([f"case{i:02d}_img.nii.gz", f"case{i:02d}_mask.nii.gz", split])
    cfg = {"kind": "tests.data.user_loader.from_csv", "root": str(root), "task_type": "multiclass",
           "classes": {"left": [17], "right": [53]}, "preprocess": {"orientation": "RAS"}, "loader": {}}
    ds = load_dataset(cfg)
    assert [c["id"] for c in ds["train"]] == ["case00_img", "case01_img"] and len(ds["test"]) == 1
    assert ds.task.classes == ("left", "right")
    assert load_dataset({**cfg, "kind": "tests.data.user_loader:from_csv"})["test"] == ds["test"]

    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg.loaders'"):
        load_dataset({**cfg, "kind": "no_such_pkg.loaders.load"})
    with pytest.raises(ValueError, match="has no function 'missing'"):
        load_dataset({**cfg, "kind": "tests.data.user_loader.missing"})
    with pytest.raises(TypeError, match="returns a DatasetSplits or a mapping"):
        load_dataset({"kind": "tests.data.user_loader.not_a_mapping", "root": str(root)})
    with pytest.raises(ValueError, match="unknown dataset kind 'nifti'"):
        load_dataset({"kind": "nifti"})
    with pytest.raises(ValueError, match="needs data.classes"):
        load_dataset({"kind": "tests.data.user_loader.from_csv", "root": str(root), "task_type": "multiclass"})

    (root / "case01_mask.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 file\(s\) named by the dataset do not exist \(train: .*case01"):
        load_dataset(cfg)
    msd_root = msd_dataset(tmp_path / "msd", n=3)
    meta = json.loads((msd_root / "dataset.json").read_text())
    meta["training"].append({"image": "./imagesTr/gone.nii.gz", "label": "./labelsTr/gone.nii.gz"})
    (msd_root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(FileNotFoundError, match="lists files that do not exist.*gone.nii.gz"):
        load_dataset({"kind": "msd", "root": str(msd_root)})
    with pytest.raises(FileNotFoundError, match="is .* an MSD task folder"):
        load_dataset({"kind": "msd", "root": str(tmp_path / "nothing")})
