"""Data for the recipes: the embedded template-derived cohort and real datasets by path, for binary, multi-class and
multi-label segmentation, at any scale.

:mod:`peft_tensor.data.loaders` -- layouts (MSD / decathlon datalists, image/mask pairs, BraTS 2021, the embedded
cohort, a user's loader by dotted path); :mod:`peft_tensor.data.labels` -- the task (classes, label codes, output
channels); :mod:`peft_tensor.data.transforms` -- configurable preprocessing and seeded augmentation;
:mod:`peft_tensor.data.datasets` -- MONAI ``Dataset`` / ``CacheDataset`` / ``PersistentDataset`` and the training
``DataLoader``."""

from .datasets import CaseSource, LoaderSettings, train_loader
from .labels import BRATS_REGIONS, BTCV_ORGANS, LabelTask, make_task
from .loaders import DatasetSplits, brats2021, embedded, load_dataset, msd, msd_hippocampus, pairs_folder
from .transforms import Case, Preprocess, load_cases, sample_batch

__all__ = [
    "BRATS_REGIONS",
    "BTCV_ORGANS",
    "Case",
    "CaseSource",
    "DatasetSplits",
    "LabelTask",
    "LoaderSettings",
    "Preprocess",
    "brats2021",
    "embedded",
    "load_cases",
    "load_dataset",
    "make_task",
    "msd",
    "msd_hippocampus",
    "pairs_folder",
    "sample_batch",
    "train_loader",
]
