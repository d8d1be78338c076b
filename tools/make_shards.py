"""Turn an image folder (labelled by class sub-folder or not; train/ test/ val/ split folders each become a
split) into webdataset tar shards plus the `_info.json` index that `data.dataset=webdataset` reads:

    python tools/make_shards.py SRC_DIR OUT_DIR --shard-size 1000
    python tools/make_shards.py --index-only OUT_DIR      # count the samples of existing shards, write the index

The image files are stored byte for byte; the work is in selfsup/shards.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfsup.shards import index_shards, write_shards  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="image folder (or, with --index-only, the shard folder)")
    parser.add_argument("out", nargs="?", help="folder the shards are written to")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the order the samples are written in")
    parser.add_argument("--index-only", action="store_true", help="only (re)write SRC/_info.json from its .tar shards")
    args = parser.parse_args(argv)
    if args.index_only:
        info = index_shards(args.src)
    else:
        if args.out is None:
            parser.error("OUT_DIR is required (or pass --index-only)")
        info = write_shards(args.src, args.out, args.shard_size, seed=args.seed)
    for name, split in info["splits"].items():
        print(f"{name}: {split['num_samples']} samples in {len(split['filenames'])} shards")
    return info


if __name__ == "__main__":
    from selfsup.cli.common import exit_on_user_error

    exit_on_user_error(main)()
