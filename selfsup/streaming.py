"""Streamed shards (webdataset tars): every sample once per epoch for any world size x workers, resumable
at the very batch a run stopped at, in an order that depends on (seed, epoch, world size, batch size) only.

Written by hand over webdataset's tar reading and URL opening (`tarfile_samples`, `gopen`), because neither
webdataset's pipeline nor timm's `ReaderWds` promises an exact epoch: timm cuts each worker's stream to a
fixed length (`with_epoch`), which repeats or drops up to a shard per worker, and its shuffle buffer, seeded
per worker, cannot be resumed mid-epoch.

The plan of epoch e, computed alike in every process and worker from the index (selfsup/shards.py):
  1. the shards in an order permuted by (seed, e);
  2. in blocks of `INTERLEAVE` consecutive shards, their samples interleaved at random, seeded by
     (seed, e, block), each shard keeping its own order: a reader streams a few shards at once, no buffer;
  3. process r of W takes the contiguous slice [r N / W, (r+1) N / W) of that sequence (it reads only the
     shards its slice touches) and cuts it into batches of B; every process makes (N // W) // B batches, so
     they step together, and the < B + 1 samples left at each slice's end wait for another epoch (as with
     drop_last; the plan differs every epoch, so it is different samples each time);
  4. DataLoader worker j of k makes that process's batches j, j + k, ...; the loader takes one batch from
     each worker in turn, so the order is the same for any k. Worker j reads the other batches' bytes and
     skips them undecoded (on local disks the page cache serves the k readers of a shard).
Resuming at batch b of epoch e starts every worker at batch b: the same samples, the same views (seeded by
(seed, e, sample id) as in sampling.py). A sample that does not decode, or is missing from a truncated shard,
is counted and the last readable sample of the same worker stands in for it (its views still seeded by the
missing sample's id), so batches keep their size and processes their step count.
"""

from __future__ import annotations

import multiprocessing
import warnings
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from selfsup.data import _mix_seed
from selfsup.images import BrokenImageError, load_image
from selfsup.sampling import make_views
from selfsup.shards import ShardIndex, import_webdataset

__all__ = ["INTERLEAVE", "ShardStream", "epoch_blocks", "process_slice"]

INTERLEAVE = 4  # shards read at once by one reader; their samples are interleaved at random
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "pgm")


def epoch_blocks(lengths: tuple[int, ...], seed: int, epoch: int) -> list[tuple[int, list[int]]]:
    """(start in the epoch's sequence, shard numbers) of every block of INTERLEAVE shards, in order."""
    generator = torch.Generator().manual_seed(_mix_seed(seed, epoch))
    order = torch.randperm(len(lengths), generator=generator).tolist()
    blocks, start = [], 0
    for b in range(0, len(order), INTERLEAVE):
        shards = order[b:b + INTERLEAVE]
        blocks.append((start, shards))
        start += sum(lengths[s] for s in shards)
    return blocks


def block_pattern(lengths: list[int], seed: int, epoch: int, block_start: int) -> np.ndarray:
    """Which of the block's shards gives the sample at each position of the block: [sum(lengths)] ints."""
    pattern = np.repeat(np.arange(len(lengths)), lengths)
    return np.random.default_rng(_mix_seed(seed, epoch, block_start)).permutation(pattern)


def process_slice(num_samples: int, world: int, rank: int, batch_size: int) -> tuple[int, int]:
    """(first position, number of whole batches) of process `rank`'s part of an epoch; the count is equal on all."""
    return rank * num_samples // world, (num_samples // world) // batch_size


class ShardStream(IterableDataset):
    """Views of streamed shard samples, `(views, label)` like ViewDataset; set up by the engine
    (`configure`: batch size, rank, world size) and positioned before each pass (`set_position`)."""

    def __init__(self, index: ShardIndex, transform: Callable[[Any], Any], seed: int = 0) -> None:
        self.index = index
        self.transform = transform
        self.seed = seed
        self.num_classes = index.num_classes
        self.offsets = np.concatenate([[0], np.cumsum(index.lengths)[:-1]]).astype(np.int64)  # sample id of a shard's first
        self.batch_size, self.rank, self.world = 1, 0, 1
        # shared with forked (persistent) DataLoader workers: where the next pass starts, samples skipped
        context = multiprocessing.get_context("fork")
        self._epoch, self._start = context.Value("q", 0), context.Value("q", 0)
        self._broken = context.Value("q", 0)
        self._warned: set[str] = set()

    def configure(self, batch_size: int, rank: int = 0, world: int = 1) -> "ShardStream":
        self.batch_size, self.rank, self.world = batch_size, rank, world
        return self

    def set_position(self, epoch: int, batch: int = 0) -> None:
        """The next pass makes epoch `epoch` from its batch `batch` on (what a resumed run skips)."""
        self._epoch.value, self._start.value = epoch, batch

    @property
    def broken_images(self) -> int:
        return int(self._broken.value)

    def batches_per_epoch(self) -> int:
        return process_slice(self.index.num_samples, self.world, self.rank, self.batch_size)[1]

    def __len__(self) -> int:  # the DataLoader's len() is this // batch_size: this process's batches
        return self.batches_per_epoch() * self.batch_size

    # -- reading --------------------------------------------------------------------------------

    def positions(self, epoch: int, first: int, stop: int) -> Iterator[tuple[int, int, int, int]]:
        """(block start, position in the epoch, shard, index in the shard) for positions first..stop-1 of
        epoch `epoch`."""
        lengths = self.index.lengths
        for block_start, shards in epoch_blocks(lengths, self.seed, epoch):
            block_len = sum(lengths[s] for s in shards)
            if block_start + block_len <= first:
                continue
            if block_start >= stop:
                return
            pattern = block_pattern([lengths[s] for s in shards], self.seed, epoch, block_start)
            lo, hi = max(first, block_start) - block_start, min(stop, block_start + block_len) - block_start
            taken = np.bincount(pattern[:lo], minlength=len(shards))  # read by earlier positions
            for p in range(lo, hi):
                i = pattern[p]
                yield block_start, block_start + p, shards[i], int(taken[i])
                taken[i] += 1

    def _open(self, shard: int, skip: int) -> Iterator[dict]:
        """Samples of one shard from its `skip`-th on; stops early (with a warning) on a truncated tar."""
        wds = import_webdataset()
        url = self.index.urls[shard]

        def handler(error: Exception) -> bool:
            self._warn(url, f"shard {url} is unreadable from here on ({error}); its remaining samples are skipped")
            return False

        samples = wds.tariterators.tarfile_samples([{"url": url}], handler=handler)
        try:
            yield from islice(samples, skip, None)
        finally:
            samples.close()  # closes the shard's file or pipe

    def _decode(self, sample: dict | None, shard: int) -> tuple[Image.Image, int]:
        if sample is None:
            raise BrokenImageError(f"{self.index.urls[shard]} (sample missing)", RuntimeError("truncated shard"))
        name = f"{sample.get('__url__', self.index.urls[shard])}:{sample.get('__key__')}"
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        if key is None:
            raise BrokenImageError(name, ValueError(
                f"no image among its members {sorted(k for k in sample if not k.startswith('__'))}"))
        image = load_image(sample[key], name)
        try:
            label = int(sample["cls"]) if "cls" in sample else -1
        except ValueError as e:
            raise BrokenImageError(name, e) from e
        return image, label

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        epoch, start = int(self._epoch.value), int(self._start.value)
        first, batches = process_slice(self.index.num_samples, self.world, self.rank, self.batch_size)
        size = self.batch_size
        readers: dict[int, Iterator[dict]] = {}
        block = None
        standin, waiting = None, []  # the last readable (image, label); positions waiting for one
        for block_start, position, shard, in_shard in self.positions(epoch, first + start * size, first + batches * size):
            if block_start != block:  # a new block of shards: close the last one's
                for reader in readers.values():
                    reader.close()
                readers, block = {}, block_start
            if shard not in readers:
                readers[shard] = self._open(shard, in_shard)
            sample = next(readers[shard], None)
            if ((position - first) // size - start) % workers != worker:
                continue  # another worker's batch: read past it, undecoded
            sample_id = int(self.offsets[shard]) + in_shard
            try:
                standin = self._decode(sample, shard)
            except BrokenImageError as e:
                with self._broken.get_lock():
                    self._broken.value += 1
                self._warn(e.path, f"skipping unreadable sample ({e}); a readable one stands in")
                if standin is None:
                    waiting.append(sample_id)
                    continue
                yield self._views(standin, epoch, sample_id)
                continue
            for waiting_id in waiting:
                yield self._views(standin, epoch, waiting_id)
            waiting = []
            yield self._views(standin, epoch, sample_id)
        for reader in readers.values():
            reader.close()
        if waiting:
            raise BrokenImageError(self.index.urls[0], RuntimeError(f"no readable sample among {len(waiting)} of this worker"))

    def _views(self, item: tuple[Image.Image, int], epoch: int, sample_id: int) -> tuple[Any, int]:
        image, label = item
        return make_views(self.transform, image, _mix_seed(self.seed, epoch, sample_id)), label
