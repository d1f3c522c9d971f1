"""Data for the recipes: the embedded template-derived cohort and real datasets by path.

See :mod:`peft_tensor.data.embedded` for what the default cohort is (and is not) and
:mod:`peft_tensor.data.loaders` for the supported layouts (MSD Task04, image/mask pairs, BraTS 2021)."""

from .loaders import DatasetSplits, brats2021, embedded, load_dataset, msd_hippocampus, pairs_folder
from .transforms import Case, load_cases, sample_batch

__all__ = [
    "Case",
    "DatasetSplits",
    "brats2021",
    "embedded",
    "load_cases",
    "load_dataset",
    "msd_hippocampus",
    "pairs_folder",
    "sample_batch",
]
