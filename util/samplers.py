"""Samplers: a resumable distributed training sampler, an exact evaluation shard, and the per-epoch
re-seeding of persistent loader workers (so that an epoch's augmentations depend only on (seed, epoch,
rank), and a run resumed at any step sees the same images and draws as the uninterrupted one)."""
from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterator
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler, get_worker_info

from util.errors import UserError


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler (the same order for a given seed and epoch) that can start mid-epoch.

    ``set_epoch(epoch, start_index)`` skips this rank's first ``start_index`` samples, so a job
    preempted after k steps resumes at step k without loading the images it already trained on.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, shuffle: bool = True, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.start_index = 0

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        super().set_epoch(epoch)
        self.start_index = min(start_index, self.num_samples)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start_index:])

    def __len__(self) -> int:
        return self.num_samples - self.start_index


class ShardSampler(Sampler):
    """Rank r of w takes samples r, r + w, r + 2w, ...: every sample once, none repeated, so that
    summed counts over ranks give exact distributed accuracy."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int):
        self.indices = list(range(rank, len(dataset), num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class EpochSeeds(Sampler):
    """Wraps a DistributedSampler: yields (worker seed key, index) pairs, the key being the sampler's
    (seed, epoch, rank) when the epoch's iteration starts."""

    def __init__(self, sampler: DistributedSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[tuple[int, int, int], int]]:
        key = (self.sampler.seed, self.sampler.epoch, self.sampler.rank)
        return ((key, index) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class EpochSeededDataset(Dataset):
    """Takes the (key, index) pairs of ``EpochSeeds``; a worker process re-seeds Python's, NumPy's and
    torch's generators from (key, worker id) at its first item of each epoch.

    Persistent workers are seeded once by PyTorch, so without this an epoch's augmentations would depend
    on the epochs before it, and a run resumed at an epoch boundary would differ from the uninterrupted
    one. In the main process (``num_workers`` 0) nothing is re-seeded: util.checkpoint.seed_epoch seeds
    that stream per epoch."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.key: Optional[tuple[int, int, int]] = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[tuple[int, int, int], int]):
        key, index = item
        worker = get_worker_info()
        if worker is not None and key != self.key:
            self.key = key
            state = np.random.SeedSequence([*key, worker.id]).generate_state(2)
            random.seed(int(state[0]))
            np.random.seed(int(state[1]))
            torch.manual_seed(int(state[0]) << 32 | int(state[1]))
        return self.dataset[index]


def dataset_fingerprint(dataset: Dataset) -> dict:
    """The training set as the sampler sees it: its size and a hash of its files in order (relative to its
    root, so a moved copy of the same set matches)."""
    if hasattr(dataset, 'samples'):  # ImageFolder
        items = [f"{os.path.relpath(path, dataset.root)}\t{label}" for path, label in dataset.samples]
    elif hasattr(dataset, 'paths'):  # the selected wild images (relative), then --pos_num's originals (absolute)
        absolute = [p for p in dataset.paths if os.path.isabs(p)]
        base = os.path.commonpath(absolute) if absolute else ''
        if len(absolute) == 1:
            base = os.path.dirname(base)
        items = [os.path.relpath(p, base) if os.path.isabs(p) else p for p in dataset.paths]
    else:
        items = None
    digest = hashlib.sha1('\n'.join(items).encode('utf-8')).hexdigest() if items is not None else None
    return {'images': len(dataset), 'sha1': digest}


def check_same_permutation(saved: dict, path: str, seed: int, data: dict, epoch: int) -> None:
    """A mid-epoch checkpoint continues the epoch's permutation of the training set where it stopped: only
    the same set and --seed draw the same permutation; otherwise some images would be trained twice in the
    epoch and others not at all. ``saved``: the checkpoint's recorded args."""
    changed = []
    if saved.get('seed') is not None and saved['seed'] != seed:
        changed.append(f"--seed {saved['seed']} then, {seed} now")
    before = saved.get('train_data')
    if before and before != data:
        changed.append(f"the training set: {before['images']} images then, {data['images']} now"
                       + (' (same count, other files)' if before['images'] == data['images'] else ''))
    if changed:
        raise UserError(f"--resume {path}: it stopped inside epoch {epoch}, which continues only with the same "
                        f"training set and --seed, but {'; '.join(changed)}: the rest of the epoch would train some "
                        "images twice and skip others. Resume with the same data and --seed, or from an "
                        "end-of-epoch checkpoint (checkpoint-<epoch>.pth).")
