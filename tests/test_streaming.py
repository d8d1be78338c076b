"""Webdataset shards: make_shards round trip, exact epochs for any world size x workers, resume at a batch,
corrupt and truncated shards; and the same through pretrain.py (a run killed mid-epoch resumes where it stopped)."""

from __future__ import annotations

import json
import signal
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from selfsup.checkpoints import list_checkpoints
from selfsup.config import ConfigError
from selfsup.shards import INDEX_FILE, index_shards, read_index, write_shards
from selfsup.streaming import ShardStream, epoch_blocks, process_slice
from tests.conftest import tiny_config_dict, write_config
from tests.multiproc import WORKERS_DIR, run_workers
from tests.test_reliability import SLOW, assert_same_weights, final_weights, run_cli, wait_for_step

pytest.importorskip("webdataset")


def image_folder(root: Path, counts: dict[str, int], size: int = 4) -> dict[int, int]:
    """Class folders of PNGs whose pixels all hold the image's number (0..): number -> class index."""
    labels, number = {}, 0
    for label, (name, count) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for _ in range(count):
            Image.fromarray(np.full((size, size), number, np.uint8)).save(root / name / f"{number:04d}.png")
            labels[number] = label
            number += 1
    return labels


def pixel(image: Image.Image) -> torch.Tensor:
    """A 'view' that is the image's number, so a batch says which images it holds."""
    return torch.tensor(image.getpixel((0, 0)))


def uneven_shards(root: Path, lengths: list[int], label=lambda n: n % 3) -> Path:
    """Shards of the given lengths; sample k of the split is the image numbered k, labelled label(k)."""
    root.mkdir(parents=True, exist_ok=True)
    number = 0
    for s, n in enumerate(lengths):
        with tarfile.open(root / f"train-{s:06d}.tar", "w") as tar:
            for _ in range(n):
                for ext, data in (("png", png_bytes(number)), ("cls", str(label(number)).encode())):
                    info = tarfile.TarInfo(f"{number:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, __import__("io").BytesIO(data))
                number += 1
    index_shards(root)
    return root


def png_bytes(value: int) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.full((4, 4), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def seen(stream: ShardStream, workers: int, epoch: int = 0, start: int = 0) -> list[list[int]]:
    """The batches (image numbers) one process's loader gives for `epoch` from batch `start`."""
    stream.set_position(epoch, start)
    loader = DataLoader(stream, batch_size=stream.batch_size, num_workers=workers, drop_last=True)
    assert len(loader) == stream.batches_per_epoch()
    return [batch[0].tolist() for batch in loader]


LENGTHS = [7, 3, 8, 5, 7]  # 30 samples in 5 uneven shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return uneven_shards(tmp_path_factory.mktemp("shards"), LENGTHS)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_sample_once_per_epoch_for_any_world_size_and_workers(shards, world):
    index = read_index(shards)
    assert index.lengths == tuple(LENGTHS) and index.num_samples == 30
    per_workers = {}
    for workers in (0, 1, 2):
        batches = []
        for rank in range(world):  # the processes, simulated in turn
            stream = ShardStream(index, pixel, seed=3).configure(batch_size=5, rank=rank, world=world)
            mine = seen(stream, workers)
            assert len(mine) == 30 // world // 5  # every process steps the same number of times
            batches.extend(mine)
        per_workers[workers] = batches
        numbers = [n for batch in batches for n in batch]
        assert sorted(numbers) == list(range(30)), (world, workers)  # all of them, none twice
    assert per_workers[0] == per_workers[1] == per_workers[2]  # the order does not depend on the workers


def test_an_epoch_that_does_not_split_evenly_leaves_a_short_tail_and_repeats_nothing(shards):
    index = read_index(shards)
    for world, batch in ((2, 4), (3, 4), (3, 7)):
        numbers = []
        for rank in range(world):
            numbers += [n for b in seen(ShardStream(index, pixel).configure(batch, rank, world), 0, epoch=1) for n in b]
        assert len(numbers) == len(set(numbers)) == world * (30 // world // batch) * batch
        assert 30 - len(numbers) < world * (batch + 1)  # what waits for another epoch: under one batch per process


def test_epochs_are_new_orders_and_a_seed_repeats_them(shards):
    index = read_index(shards)
    one = [seen(ShardStream(index, pixel, seed=0).configure(5), 0, epoch=e) for e in (0, 1)]
    assert one[0] != one[1]
    assert seen(ShardStream(index, pixel, seed=0).configure(5), 2, epoch=1) == one[1]
    assert seen(ShardStream(index, pixel, seed=1).configure(5), 0, epoch=1) != one[1]
    # interleaved: a batch mixes shards rather than reading one shard front to back
    assert any(len({n // 7 for n in batch}) > 1 for batch in one[0])


def test_resuming_at_a_batch_gives_the_rest_of_the_epoch(shards):
    index = read_index(shards)
    for world, rank, workers in ((1, 0, 2), (2, 1, 0)):
        whole = seen(ShardStream(index, pixel, seed=5).configure(3, rank, world), 0, epoch=2)
        for start in (1, len(whole) - 1):
            rest = seen(ShardStream(index, pixel, seed=5).configure(3, rank, world), workers, epoch=2, start=start)
            assert rest == whole[start:]


def test_a_process_reads_only_the_shards_its_slice_touches(shards):
    index = read_index(shards)
    first, batches = process_slice(30, 3, 0, 5)
    stream = ShardStream(index, pixel).configure(5, 0, 3)
    touched = {shard for _, _, shard, _ in stream.positions(0, first, first + batches * 5)}
    blocks = epoch_blocks(index.lengths, 0, 0)
    assert touched <= set(blocks[0][1]) and len(blocks[0][1]) == 4  # the first block of 4 interleaved shards only


def test_corrupt_and_missing_samples_are_counted_and_stood_in_for(tmp_path):
    root = uneven_shards(tmp_path / "s", [6, 6])
    broken = tmp_path / "train-000000.tar"
    with tarfile.open(root / "train-000000.tar") as src, tarfile.open(broken, "w") as dst:
        for member in src:
            data = src.extractfile(member).read()
            if member.name == "00000002.png":
                data = b"not a png"
            member.size = len(data)
            dst.addfile(member, __import__("io").BytesIO(data))
    broken.replace(root / "train-000000.tar")
    full = (root / "train-000001.tar").read_bytes()
    (root / "train-000001.tar").write_bytes(full[: len(full) // 2])  # truncated: its last samples are missing
    stream = ShardStream(read_index(root), pixel).configure(4)
    with pytest.warns(UserWarning, match="unreadable"):
        batches = seen(stream, 0)
    numbers = [n for b in batches for n in b]
    assert len(numbers) == 12 and 2 not in numbers  # batches keep their size
    missing = 12 - len(set(numbers))
    assert stream.broken_images >= 2 and missing == stream.broken_images


def test_make_shards_round_trip_keeps_bytes_and_labels(tmp_path):
    labels = image_folder(tmp_path / "src" / "train", {"a": 5, "b": 4, "c": 3})
    image_folder(tmp_path / "src" / "test", {"a": 1, "b": 1, "c": 1})
    info = write_shards(tmp_path / "src", tmp_path / "out", shard_size=5)
    assert info["splits"]["train"]["shard_lengths"] == [5, 5, 2] and info["num_classes"] == 3
    assert json.loads((tmp_path / "out" / INDEX_FILE).read_text()) == info
    assert index_shards(tmp_path / "out", write=False)["splits"] == info["splits"]  # counted = written
    index = read_index(tmp_path / "out", "train")
    stream = ShardStream(index, pixel).configure(12)
    stream.set_position(0, 0)
    got = {int(v): label for v, label in stream}
    assert got == labels
    with pytest.raises(ConfigError, match="no split 'val'"):
        read_index(tmp_path / "out", "val")


# -- real processes and pretrain.py ---------------------------------------------------------------


@pytest.mark.slow  # ~10 s of launch on an idle 2-core machine (56 s wall under a load of 15)
def test_two_real_processes_split_an_epoch_exactly(tmp_path):
    shards = uneven_shards(tmp_path / "shards", [5, 4, 3])  # 12 = 2 processes x 2 batches x 3
    run_workers(WORKERS_DIR / "stream_worker.py", shards, tmp_path)
    for rank in (0, 1):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record["world_size"] == 2 and set(record["checks"].values()) == {"ok"}, record


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_at_the_sample_it_stopped(tmp_path):
    shards = uneven_shards(tmp_path / "shards", [13, 9, 17, 11, 10], label=lambda n: n)  # 60 samples: label = number
    cfg = tiny_config_dict(
        tmp_path, method={**SLOW, "name": "tests.fault_methods:RecordingSimCLR"},
        data={"dataset": "webdataset", "root": str(shards), "batch_size": 8, "num_workers": 2},
        train={"max_steps": 14, "checkpoint_every_steps": 2, "run_name": "run"},  # 7 steps per epoch
    )
    records = {}
    for name in ("straight", "killed"):
        cfg["train"]["run_name"] = name
        config = write_config(tmp_path, cfg, f"{name}.yaml")
        run_dir = tmp_path / "runs" / name
        env = {"SELFSUP_TEST_RECORD": str(tmp_path / f"{name}.jsonl")}
        if name == "killed":
            proc = run_cli(config, sleep=0.3, env=env)
            wait_for_step(proc, run_dir, 11)  # in the second epoch
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            resumed_at = max(int(p.name.split("_")[1]) for p in list_checkpoints(run_dir / "checkpoints"))
            assert 10 <= resumed_at < 14
            before = read_batches(tmp_path / f"{name}.jsonl")[:resumed_at]
            (tmp_path / f"{name}.jsonl").unlink()
        proc = run_cli(config, env=env)
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
        records[name] = (before if name == "killed" else []) + read_batches(tmp_path / f"{name}.jsonl")
        records[name + "_weights"] = final_weights(run_dir)
    assert records["killed"] == records["straight"] and len(records["straight"]) == 14
    epoch = [n for batch in records["straight"][:7] for n in batch]
    assert len(set(epoch)) == len(epoch) == 56  # one epoch: 56 of the 60 samples, none twice
    assert_same_weights(records["killed_weights"], records["straight_weights"])


def read_batches(path: Path) -> list[list[int]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_make_shards_tool_and_index_only(tmp_path, capsys):
    import tools.make_shards

    image_folder(tmp_path / "src", {"a": 3, "b": 4})
    tools.make_shards.main([str(tmp_path / "src"), str(tmp_path / "out"), "--shard-size", "4"])
    assert "train: 7 samples in 2 shards" in capsys.readouterr().out
    (tmp_path / "out" / INDEX_FILE).unlink()
    assert tools.make_shards.main(["--index-only", str(tmp_path / "out")])["splits"]["train"]["shard_lengths"] == [4, 3]


def test_missing_library_and_unsupported_keys_are_one_line_config_errors(shards, tmp_path, monkeypatch):
    from selfsup.builders import build_pretraining
    from selfsup.config import from_dict
    from selfsup.data import build_dataset
    from selfsup.shards import import_webdataset

    cfg = tiny_config_dict(tmp_path, data={"dataset": "webdataset", "root": str(shards), "subset": 10})
    with pytest.raises(ConfigError, match="data.subset"):
        build_pretraining(from_dict(cfg))
    with pytest.raises(ConfigError, match="eval.dataset"):
        build_dataset("webdataset", root=shards)
    monkeypatch.setitem(__import__("sys").modules, "webdataset", None)  # as if not installed
    with pytest.raises(ConfigError, match=r'pip install "selfsup\[stream\]"'):
        import_webdataset()
