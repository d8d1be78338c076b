"""Per-epoch sampling and views: what makes a resumed run bit-identical to an uninterrupted one.

`EpochSampler` yields `(epoch, index)` keys in an order that is a permutation seeded by (seed, epoch)
alone. `ViewDataset` makes sample `index`'s views under a torch seed derived from (seed, epoch, index)
alone (`selfsup.data._mix_seed`), inside `fork_rng` so the caller's random stream is untouched. So an
epoch's order and each sample's views depend neither on the worker or process that loads it, nor on
the number of workers, nor on the step a run resumed at: a resumed run skips the batches already
seen, in the same order, and draws the same views. Unreadable images are skipped (the next readable
item stands in), counted across workers and warned about once per file.
"""

from __future__ import annotations

import multiprocessing
import operator
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from selfsup.data import BrokenImageError, _mix_seed

__all__ = ["EpochSampler", "ViewDataset", "make_views"]


class EpochSampler(Sampler):
    """Yields `(epoch, index)` keys so that ViewDataset can seed each sample's views by position
    in the data, not by worker or step; the order is a permutation seeded by (seed, epoch).
    """

    def __init__(self, num_samples: int, *, shuffle: bool = True, seed: int = 0) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the engine at the start of every epoch (same name as DistributedSampler's)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch))
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = range(self.num_samples)
        epoch = self.epoch
        for index in order:
            yield epoch, index


class ViewDataset(Dataset):
    """Applies `transform` to `base` items under a torch seed derived from (seed, epoch, index), so
    sample i's views in epoch e are the same whichever worker or process makes them.
    """

    def __init__(self, base: Dataset, transform: Callable[[Any], Any], seed: int = 0) -> None:
        self.base = base
        self.transform = transform
        self.seed = seed
        self.num_classes = getattr(base, "num_classes", None)
        # unreadable files skipped so far, shared with forked DataLoader workers (read by the engine)
        self._broken = multiprocessing.get_context("fork").Value("q", 0)
        self._warned: set[str] = set()

    @property
    def broken_images(self) -> int:
        return int(self._broken.value) if self._broken is not None else 0

    def __getstate__(self) -> dict[str, Any]:  # spawn-started workers keep a local count only
        return {**self.__dict__, "_broken": None}

    def __len__(self) -> int:
        return len(self.base)

    def _load(self, index: int) -> tuple[Any, int]:
        """base[index], or, if that file is broken, the next readable item (one warning per file)."""
        n = len(self.base)
        for attempt in range(n):
            try:
                return self.base[(index + attempt) % n]
            except BrokenImageError as e:
                if self._broken is not None:
                    with self._broken.get_lock():
                        self._broken.value += 1
                if e.path not in self._warned:
                    self._warned.add(e.path)
                    warnings.warn(f"skipping unreadable image ({e}); the run goes on with the next image", stacklevel=2)
        raise BrokenImageError(getattr(self.base, "root", "the dataset"), RuntimeError("no readable image left"))

    def __getitem__(self, key: tuple[int, int] | int) -> tuple[Any, int]:
        if isinstance(key, (tuple, list)):
            epoch, index = (operator.index(k) for k in key)
        else:
            epoch, index = 0, operator.index(key)
        image, label = self._load(index)
        return make_views(self.transform, image, _mix_seed(self.seed, epoch, index)), label


def make_views(transform: Callable[[Any], Any], image: Any, seed: int) -> Any:
    """`transform(image)` drawing from the CPU generator seeded with `seed`, the caller's stream untouched."""
    # fork_rng restores the global CPU generator afterwards, so the caller's stream is untouched.
    # Per-image ops on small tensors run ~5-10x slower with several intra-op threads; DataLoader
    # workers already use one, the main process (num_workers=0) is switched to one here.
    threads = torch.get_num_threads()
    single = threads > 1 and torch.utils.data.get_worker_info() is None
    with torch.random.fork_rng(devices=[]):
        # the CPU generator only (what fork_rng restores and the transforms draw from): torch.manual_seed
        # would also queue a lazy CUDA seeding that records a stack trace, ~1 ms per image without a GPU
        torch.random.default_generator.manual_seed(seed)
        if single:
            torch.set_num_threads(1)
        try:
            return transform(image)
        finally:
            if single:
                torch.set_num_threads(threads)
