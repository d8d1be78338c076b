"""2 real processes read one epoch of webdataset shards through the engine's loader: together they see every
sample once, each the same number of batches. Args: SHARD_DIR OUT_DIR."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from selfsup.config import DataConfig
from selfsup.engine import make_loader
from selfsup.shards import read_index
from selfsup.streaming import ShardStream
from tests.workers.harness import finish, start


def number(image) -> torch.Tensor:
    return torch.tensor(image.getpixel((0, 0)))


def main() -> None:
    shards, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    accelerator, world, rank = start(2)
    index = read_index(shards)
    stream = ShardStream(index, number, seed=1)
    loader = make_loader(stream, DataConfig(batch_size=3, num_workers=1), seed=1)
    stream.set_position(0, 0)
    mine = [int(n) for batch, _ in loader for n in batch]
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine)

    def every_sample_once() -> None:
        seen = [n for part in everyone for n in part]
        assert sorted(seen) == list(range(index.num_samples)), seen
        assert len({len(part) for part in everyone}) == 1 and len(mine) == len(loader) * 3

    finish(accelerator, out_dir, {"every_sample_once": every_sample_once})


if __name__ == "__main__":
    main()
