"""Cases at scale: MONAI ``Dataset`` / ``CacheDataset`` / ``PersistentDataset`` under the preprocessing, and a
``DataLoader`` whose workers crop and augment the training samples.

``data.loader`` in a config (:class:`LoaderSettings`):

=================  ==============================================================================================
``dataset``        ``cache`` (MONAI ``CacheDataset``: preprocess once, keep ``cache_rate`` of the cases in memory;
                   the default, what the recipes always did), ``persistent`` (``PersistentDataset``: preprocess
                   once into ``cache_dir`` on disk, read back per use: datasets larger than memory), ``dataset``
                   (``Dataset``: preprocess at every use, nothing kept)
``cache_rate``     fraction of the cases ``cache`` keeps in memory (the rest are preprocessed at every use)
``cache_dir``      the ``persistent`` cache folder (default ``<output_dir>/cache`` in the recipes)
``num_workers``    DataLoader worker processes that load, crop and augment training samples (0: in the main
                   process); also used to fill the ``cache`` in parallel
``pin_memory``     ``auto`` (on when training on CUDA), true or false
``prefetch``       batches each worker prepares ahead
=================  ==============================================================================================

Every training sample is a pure function of (seed, step, position in the global batch), whichever dataset class
and however many workers: :class:`TrainSamples` draws sample ``(step, j)`` as
:func:`peft_tensor.data.transforms.sample_batch` does, and :class:`StepSampler` hands each process its slice of
each step. Resume and multi-process training therefore stay exact.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from .labels import as_task
from .transforms import Preprocess, draw_sample, preprocessing, to_case

DATASET_CLASSES = ("cache", "persistent", "dataset")


@dataclass
class LoaderSettings:
    dataset: str = "cache"
    cache_rate: float = 1.0
    cache_dir: str | None = None
    num_workers: int = 0
    pin_memory: str | bool = "auto"
    prefetch: int = 2

    def __post_init__(self):
        if self.dataset not in DATASET_CLASSES:
            raise ValueError(f"data.loader.dataset must be one of {', '.join(DATASET_CLASSES)}, got {self.dataset!r}")
        if not 0.0 <= float(self.cache_rate) <= 1.0:
            raise ValueError(f"data.loader.cache_rate must lie in [0, 1], got {self.cache_rate}")
        if int(self.num_workers) < 0:
            raise ValueError(f"data.loader.num_workers must be >= 0, got {self.num_workers}")
        self.cache_rate, self.num_workers, self.prefetch = float(self.cache_rate), int(self.num_workers), \
            int(self.prefetch)

    @classmethod
    def from_config(cls, data_cfg: dict | None) -> "LoaderSettings":
        cfg = dict(dict(data_cfg or {}).get("loader") or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"unknown data.loader keys {unknown}; known: {sorted(known)}")
        return cls(**cfg)

    def pin(self, device: torch.device) -> bool:
        if self.pin_memory == "auto":
            return torch.device(device).type == "cuda"
        return bool(self.pin_memory)

    def to_dict(self) -> dict:
        return asdict(self)


class CaseSource(Sequence):
    """The preprocessed cases of a list of case dicts, as a sequence of :class:`peft_tensor.data.Case`.

    ``dataset`` picks where the preprocessed cases live (see the module docstring); only ``cache`` holds them in
    memory. ``source[i]`` preprocesses (or reads back) case ``i``."""

    def __init__(self, items: list, task, preprocess: Preprocess | dict | None = None, min_size=None,
                 dataset: str = "cache", cache_rate: float = 1.0, cache_dir: str | os.PathLike | None = None,
                 num_workers: int = 0, progress: bool = False):
        from monai.data import CacheDataset, Dataset, PersistentDataset

        self.items = [dict(i) for i in items]
        self.task = as_task(task)
        self.transform = preprocessing(self.task, None, min_size, preprocess)
        data = [{"image": i["image"], "label": i["label"]} for i in self.items]
        if dataset == "cache":
            self.dataset = CacheDataset(data, self.transform, cache_rate=cache_rate,
                                        num_workers=max(int(num_workers), 1), progress=progress, copy_cache=False)
        elif dataset == "persistent":
            if cache_dir is None:
                raise ValueError("data.loader.dataset=persistent needs data.loader.cache_dir (a folder for the "
                                 "preprocessed cases)")
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            # plain tensors only (ToPlainCase), so the cache is read back without unpickling arbitrary objects
            key = _settings_hash(self.task, preprocess, min_size)
            self.dataset = PersistentDataset(data, self.transform, cache_dir=cache_dir, hash_transform=lambda _: key,
                                             track_meta=False, weights_only=True)
        elif dataset == "dataset":
            self.dataset = Dataset(data, self.transform)
        else:
            raise ValueError(f"data.loader.dataset must be one of {', '.join(DATASET_CLASSES)}, got {dataset!r}")
        self.kind = dataset

    @classmethod
    def from_settings(cls, items: list, task, preprocess, min_size, settings: LoaderSettings, progress=False,
                      dataset: str | None = None) -> "CaseSource":
        return cls(items, task, preprocess, min_size, dataset or settings.dataset, settings.cache_rate,
                   settings.cache_dir, settings.num_workers, progress)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        return to_case(self.items[i], self.dataset[i])


def _settings_hash(task, preprocess, min_size) -> bytes:
    """What the persistent cache's file names depend on besides the case paths: the task, the preprocessing
    settings and the padding size (a changed preprocessing never reads stale files)."""
    import hashlib
    import json

    pre = preprocess.to_dict() if isinstance(preprocess, Preprocess) else dict(preprocess or {})
    key = json.dumps({"task": task.to_dict(), "preprocess": pre, "min_size": list(min_size or []), "v": 1},
                     sort_keys=True)
    return hashlib.sha1(key.encode()).hexdigest()[:16].encode()


class TrainSamples(torch.utils.data.Dataset):
    """Training samples indexed by ``step * global_batch + j``: sample ``j`` of step ``step``'s global batch, drawn
    and augmented exactly as :func:`peft_tensor.data.transforms.sample_batch` draws it."""

    def __init__(self, cases: Sequence, seed: int, global_batch: int, aug, softmax: bool = True):
        if len(cases) == 0:
            raise ValueError("the training split has no case")
        self.cases, self.seed, self.global_batch, self.aug, self.softmax = cases, seed, global_batch, aug, softmax

    def __len__(self) -> int:  # not used by StepSampler; a DataLoader only needs __getitem__
        return 2**62

    def __getitem__(self, index: int):
        step, j = divmod(int(index), self.global_batch)
        return draw_sample(self.cases, step, j, self.global_batch, self.seed, self.aug, self.softmax)


class StepSampler(torch.utils.data.Sampler):
    """The indices of this process's samples, step after step from ``start`` to ``steps``."""

    def __init__(self, start: int, steps: int, global_batch: int, rank: int = 0, world_size: int = 1):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} processes")
        self.start, self.steps, self.global_batch = int(start), int(steps), int(global_batch)
        self.per_rank, self.rank = global_batch // world_size, rank

    def __iter__(self):
        for step in range(self.start, self.steps):
            base = step * self.global_batch + self.rank * self.per_rank
            yield from range(base, base + self.per_rank)

    def __len__(self) -> int:
        return max(self.steps - self.start, 0) * self.per_rank


def train_loader(cases: Sequence, seed: int, global_batch: int, aug, start: int, steps: int, rank: int = 0,
                 world_size: int = 1, settings: LoaderSettings | None = None, device=torch.device("cpu"),
                 softmax: bool = True) -> torch.utils.data.DataLoader:
    """A DataLoader that yields this process's (images, labels) of steps ``start .. steps - 1`` in order; workers
    load, crop and augment. Same batches as :func:`peft_tensor.data.transforms.sample_batch`."""
    settings = settings or LoaderSettings()
    sampler = StepSampler(start, steps, global_batch, rank, world_size)
    workers = settings.num_workers
    return torch.utils.data.DataLoader(
        TrainSamples(cases, seed, global_batch, aug, softmax), batch_size=sampler.per_rank, sampler=sampler,
        num_workers=workers, pin_memory=settings.pin(device), prefetch_factor=settings.prefetch if workers else None,
        persistent_workers=False, collate_fn=_stack)


def _stack(samples):
    return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])


def _identity(x):
    return x


def iterate_cases(cases: Sequence, num_workers: int = 0):
    """The cases in order, loaded ``num_workers`` ahead in worker processes when > 0 (evaluation)."""
    if not num_workers or isinstance(cases, list):
        yield from (cases[i] for i in range(len(cases)))
        return
    yield from torch.utils.data.DataLoader(cases, batch_size=None, shuffle=False, num_workers=num_workers,
                                           collate_fn=_identity)


def case_sources(ds, data_cfg: dict, patch, output_dir=None, cached=("train", "val"), progress: bool = False):
    """``{split: CaseSource}`` of a loaded dataset (:func:`peft_tensor.data.load_dataset`) with the config's
    ``data.preprocess`` and ``data.loader``, and the :class:`LoaderSettings`.

    The splits in ``cached`` (those read again and again: training, periodic validation) use ``data.loader.dataset``;
    the others (a test set read once) are loaded case by case (MONAI ``Dataset``) so that they never need to fit in
    memory. A ``persistent`` dataset without ``cache_dir`` caches under ``<output_dir>/cache``."""
    pre = Preprocess.from_config(data_cfg)
    settings = LoaderSettings.from_config(data_cfg)
    if settings.dataset == "persistent" and not settings.cache_dir:
        if output_dir is None:
            raise ValueError("data.loader.dataset=persistent needs data.loader.cache_dir")
        settings.cache_dir = str(Path(output_dir) / "cache")
    sources = {}
    for name, items in ds.splits.items():
        if not items:
            sources[name] = []
            continue
        kind = settings.dataset if name in cached else "dataset"
        sources[name] = CaseSource.from_settings(items, ds.task, pre, patch, settings, progress, dataset=kind)
    return sources, settings
