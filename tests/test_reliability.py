"""Faults injected on purpose: killed runs, signals, half-written checkpoints, broken images, NaN losses,
wrong inputs and crafted pickles. Each asserts the recovery or the message."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import pretrain
from selfsup.checkpoints import list_checkpoints
from selfsup.engine import NonFiniteLossError
from selfsup.export import EncoderLoadError, load_encoder, save_encoder
from selfsup.backbones import create_backbone
from tests import fault_methods
from tests.conftest import ROOT, read_metrics, tiny_config_dict, write_config

SLOW = {"name": "tests.fault_methods:SlowSimCLR", "proj_hidden_dim": 64, "proj_out_dim": 32}


def run_cli(config: Path, *overrides: str, sleep: float = 0.0, env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "SELFSUP_TEST_STEP_SLEEP": str(sleep), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           **(env or {})}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "pretrain.py"), "--config", str(config), *overrides],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own process group, as under a scheduler
    )


def logged_steps(run_dir: Path) -> list[int]:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return []
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"loss"' in line]


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"run ended before step {step}:\n{proc.stdout.read()}")
        if any(s >= step for s in logged_steps(run_dir)):
            return
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"step {step} not reached in {timeout} s")


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "encoder" / "model.safetensors"))


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The uninterrupted reference: 14 steps (2 epochs of 8), checkpoints every 2."""
    tmp = tmp_path_factory.mktemp("straight")
    cfg = tiny_config_dict(tmp, method=SLOW, train={"max_steps": 14, "checkpoint_every_steps": 2, "run_name": "run"})
    proc = run_cli(write_config(tmp, cfg))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return tmp, final_weights(tmp / "runs" / "run")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_sigkill_then_resume_is_bit_identical(tmp_path, straight_run):
    cfg = tiny_config_dict(tmp_path, method=SLOW, train={"max_steps": 14, "checkpoint_every_steps": 2, "run_name": "run"})
    config = write_config(tmp_path, cfg)
    run_dir = tmp_path / "runs" / "run"
    proc = run_cli(config, sleep=0.3)
    wait_for_step(proc, run_dir, 11)  # in the second epoch (8 steps each)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    done = [int(p.name.split("_")[1]) for p in list_checkpoints(run_dir / "checkpoints")]
    assert done and 10 <= max(done) < 14 and not (run_dir / "encoder").exists()

    proc = run_cli(config)  # the same command again: train.resume=auto
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "resumed from" in out
    assert_same_weights(final_weights(run_dir), straight_run[1])


@pytest.mark.parametrize("workers, whole_group", [pytest.param(0, False, marks=pytest.mark.slow), (2, True)])
def test_sigterm_writes_a_checkpoint_then_resume_is_bit_identical(tmp_path, straight_run, workers, whole_group):
    """SIGTERM to the main process, or (as SLURM / `timeout` do) to the whole group, DataLoader workers included."""
    cfg = tiny_config_dict(tmp_path, method=SLOW, data={"num_workers": workers},
                           train={"max_steps": 14, "checkpoint_every_steps": 100, "run_name": "run"})
    config = write_config(tmp_path, cfg)
    run_dir = tmp_path / "runs" / "run"
    proc = run_cli(config, sleep=0.3)
    wait_for_step(proc, run_dir, 3)
    if whole_group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    saved = list_checkpoints(run_dir / "checkpoints")
    assert len(saved) == 1 and 3 <= int(saved[0].name.split("_")[1]) < 14, out  # not a periodic one: every 100

    proc = run_cli(config)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert_same_weights(final_weights(run_dir), straight_run[1])


def test_half_written_checkpoints_are_never_resumed_from(tmp_path):
    cfg = tiny_config_dict(tmp_path, train={"max_steps": 4, "checkpoint_every_steps": 2, "keep_checkpoints": 1})
    config = write_config(tmp_path, cfg)
    pretrain.main(["--config", str(config)])
    ckpts = tmp_path / "runs" / "tiny" / "checkpoints"
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_00000004"]  # keep_checkpoints=1 pruned step 2
    # a crash mid-write leaves a .tmp directory, or a step directory without its state file
    (ckpts / ".tmp_step_00000006").mkdir()
    (ckpts / ".tmp_step_00000006" / "model.safetensors").write_bytes(b"\0" * 10)
    (ckpts / "step_00000008").mkdir()
    (ckpts / "step_00000008" / "model.safetensors").write_bytes(b"garbage")
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_00000004"]
    summary = pretrain.main(["--config", str(config), "train.max_steps=6"])
    assert summary["steps"] == 6


def test_broken_images_are_skipped_counted_and_warned_once(tmp_path):
    root = tmp_path / "images"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(20):
            colour = (40 * i % 255, 100 if cls == "a" else 200, 30)
            Image.new("RGB", (20, 20), colour).save(root / cls / f"{i}.png")
    good = (root / "a" / "0.png").read_bytes()
    (root / "a" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "b" / "not_an_image.jpg").write_text("hello")
    cfg = tiny_config_dict(tmp_path, data={"dataset": "image_folder", "root": str(root), "batch_size": 14},
                           train={"max_steps": 6})
    with pytest.warns(UserWarning, match="skipping unreadable image") as record:
        pretrain.main(["--config", str(write_config(tmp_path, cfg))])
    warned = [str(w.message) for w in record if "skipping unreadable" in str(w.message)]
    assert len(warned) == 2 and any("truncated.png" in m for m in warned) and any("not_an_image.jpg" in m for m in warned)
    records = read_metrics(tmp_path / "runs" / "tiny")
    assert records[-1]["broken_images"] >= 2  # each of the 2 files is met once per epoch (6 steps = 2 epochs)
    assert (tmp_path / "runs" / "tiny" / "encoder" / "model.safetensors").is_file()


def test_a_folder_with_no_readable_image_stops_naming_the_path(tmp_path):
    root = tmp_path / "broken"
    root.mkdir()
    for i in range(3):
        (root / f"{i}.png").write_bytes(b"\x89PNG not really")
    cfg = tiny_config_dict(tmp_path, data={"dataset": "image_folder", "root": str(root)})
    with pytest.raises(OSError, match=str(root)):
        pretrain.main(["--config", str(write_config(tmp_path, cfg))])


def test_nan_loss_stops_with_step_last_loss_and_fixes_keeping_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFSUP_TEST_NAN_CALLS", "5")
    fault_methods.NaNSimCLR.calls = 0
    method = {"name": "tests.fault_methods:NaNSimCLR", "proj_hidden_dim": 64, "proj_out_dim": 32}
    cfg = tiny_config_dict(tmp_path, method=method, train={"max_steps": 8, "checkpoint_every_steps": 2})
    with pytest.raises(NonFiniteLossError) as err:
        pretrain.main(["--config", str(write_config(tmp_path, cfg))])
    message = str(err.value)
    assert "step 5" in message and "last finite logged loss: " in message
    assert "optim.lr" in message and "train.precision=no" in message and "train.clip_grad" in message
    assert "step_00000004" in message
    run_dir = tmp_path / "runs" / "tiny"
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step_00000002", "step_00000004"]
    encoder, _ = load_encoder(run_dir)  # the last good checkpoint loads
    weights = load_file(str(run_dir / "checkpoints" / "step_00000004" / "model.safetensors"))
    assert all(torch.isfinite(v.float()).all() for v in weights.values())
    assert torch.equal(encoder.state_dict()["conv1.weight"], weights["encoder.conv1.weight"])


def test_skip_nonfinite_skips_and_counts(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFSUP_TEST_NAN_CALLS", "3,4")
    fault_methods.NaNSimCLR.calls = 0
    method = {"name": "tests.fault_methods:NaNSimCLR", "proj_hidden_dim": 64, "proj_out_dim": 32}
    cfg = tiny_config_dict(tmp_path, method=method, train={"max_steps": 6, "skip_nonfinite": True})
    summary = pretrain.main(["--config", str(write_config(tmp_path, cfg))])
    assert summary["steps"] == 6 and summary["last_loss"] == summary["last_loss"]  # finite
    records = read_metrics(tmp_path / "runs" / "tiny")
    assert records[-1]["skipped_nonfinite"] == 2


def test_wrong_encoder_inputs_get_clear_errors(tmp_path):
    with pytest.raises(EncoderLoadError, match="does not exist"):
        load_encoder(tmp_path / "nope")
    (tmp_path / "file.safetensors").write_bytes(b"x")
    with pytest.raises(EncoderLoadError, match="is a file"):
        load_encoder(tmp_path / "file.safetensors")
    with pytest.raises(EncoderLoadError, match="holds no encoder"):
        load_encoder(tmp_path)
    small = create_backbone("resnet18_small", channels=[8, 16, 32, 64], stem_width=8)
    save_encoder(small, tmp_path / "enc")
    (tmp_path / "enc" / "model.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(EncoderLoadError, match="not a readable safetensors"):
        load_encoder(tmp_path / "enc")
    # weights of one architecture beside the description of another
    save_encoder(small, tmp_path / "mismatch")
    other = create_backbone("resnet18_small", channels=[16, 32, 64, 128], stem_width=16)
    save_encoder(other, tmp_path / "other")
    for name in ("config.json", "selfsup.json"):
        (tmp_path / "mismatch" / name).write_text((tmp_path / "other" / name).read_text())
    with pytest.raises(EncoderLoadError, match="do not fit the backbone.*shape mismatch.*re-export"):
        load_encoder(tmp_path / "mismatch")


def test_image_size_the_backbone_cannot_take_fails_before_training(tmp_path):
    cfg = tiny_config_dict(tmp_path, data={"image_size": 28},
                           backbone={"name": "vit_tiny_patch4", "kwargs": {"depth": 1, "embed_dim": 48, "num_heads": 2}})
    with pytest.raises(ValueError, match=r"cannot take 3x28x28 images.*backbone.kwargs.img_size=28"):
        pretrain.main(["--config", str(write_config(tmp_path, cfg))])
    assert not (tmp_path / "runs" / "tiny").exists()  # nothing started


def test_crafted_pickle_in_a_checkpoint_is_refused(tmp_path):
    cfg = tiny_config_dict(tmp_path, train={"max_steps": 2, "checkpoint_every_steps": 2})
    config = write_config(tmp_path, cfg)
    pretrain.main(["--config", str(config)])
    ckpt = list_checkpoints(tmp_path / "runs" / "tiny" / "checkpoints")[-1]
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (ckpt / "optimizer.bin").write_bytes(pickle.dumps(Payload()))
    from selfsup.checkpoints import CheckpointLoadError

    with pytest.raises(CheckpointLoadError, match="UnpicklingError") as info:  # the only checkpoint: none loads
        pretrain.main(["--config", str(config), "train.max_steps=4"])
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)
    assert not marker.exists()


def test_no_unsafe_torch_load_in_the_code():
    offenders = []
    for path in [*ROOT.joinpath("selfsup").rglob("*.py"), *ROOT.joinpath("tools").glob("*.py"), ROOT / "pretrain.py"]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(f"{path}:{number}")
    assert not offenders, offenders


EXIT_PROBE = """
from torch.utils.data import Dataset
from selfsup.config import DataConfig
from selfsup.engine import make_loader

class Keys(Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, key):
        return 0

LOADER = make_loader(Keys(), DataConfig(batch_size=4, num_workers=1), seed=0)  # held until exit
for _ in LOADER:
    pass
print("iterated", flush=True)
"""


def test_a_process_holding_a_loader_with_live_workers_still_exits(tmp_path):
    """Workers ignore SIGTERM (so a group SIGTERM cannot break a checkpoint); multiprocessing's exit hook
    SIGTERMs and then joins them, which would wait forever for persistent workers still alive at exit."""
    script = tmp_path / "probe.py"
    script.write_text(EXIT_PROBE)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the process hung at exit with its DataLoader worker alive:\n{out}")
    assert proc.returncode == 0 and "iterated" in out, out


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    """A safetensors file cut short in the newest checkpoint: warn, resume from the one before, finish
    (before: SafetensorError, the run could not go on without deleting the directory by hand)."""
    from selfsup.checkpoints import CheckpointLoadError

    cfg = tiny_config_dict(tmp_path, train={"max_steps": 6, "checkpoint_every_steps": 2, "keep_checkpoints": 3})
    config = write_config(tmp_path, cfg)
    pretrain.main(["--config", str(config)])
    run_dir = tmp_path / "runs" / "tiny"
    ckpts = run_dir / "checkpoints"
    straight = {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}
    straight_weights = final_weights(run_dir)
    # as if killed after step 4's checkpoint, whose weights file was then cut short (disk full, copy stopped)
    shutil.rmtree(ckpts / "step_00000006")
    weights = ckpts / "step_00000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_00000002", "step_00000004"]
    capsys.readouterr()

    summary = pretrain.main(["--config", str(config)])
    assert summary["steps"] == 6
    out = capsys.readouterr().out
    assert f"checkpoint {ckpts / 'step_00000004'} cannot be loaded" in out
    assert f"resumed from {ckpts / 'step_00000002'} at step 2" in out
    # it continued from step 2's state: steps 3-6 and the weights are the uninterrupted run's (bit-identical resume)
    resumed = [r for r in read_metrics(run_dir) if "loss" in r][len(straight):]
    assert [(r["step"], r["loss"]) for r in resumed] == [(s, straight[s]) for s in (3, 4, 5, 6)]
    assert_same_weights(final_weights(run_dir), straight_weights)
    load_file(str(weights))  # step 4 was written again, whole

    # nothing loads: one message naming the directory and both fixes
    for ckpt in list_checkpoints(ckpts):
        (ckpt / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointLoadError) as info:
        pretrain.main(["--config", str(config), "train.max_steps=8"])
    message = str(info.value)
    assert str(ckpts) in message and "train.resume=never" in message and "delete" in message and "\n" not in message
    assert pretrain.main(["--config", str(config), "train.max_steps=2", "train.resume=never"])["steps"] == 2


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_conflicting_rerun_leaves_the_finished_run_untouched_and_an_allowed_change_resumes(tmp_path):
    from selfsup.config import ConfigError

    cfg = tiny_config_dict(tmp_path, data={"batch_size": 8},
                           train={"max_steps": 2, "checkpoint_every_steps": 2, "precision": "no"})
    config = write_config(tmp_path, cfg)
    pretrain.main(["--config", str(config)])
    run_dir = tmp_path / "runs" / "tiny"
    before_config = (run_dir / "config.yaml").read_bytes()
    before_checkpoints = _files(run_dir / "checkpoints")
    with pytest.raises(ConfigError) as caught:
        pretrain.main(["--config", str(config), "method.name=moco", "optim.lr=0.1"])
    message = str(caught.value)
    assert "\n" not in message and str(run_dir) in message
    assert "method.name 'simclr' -> 'moco'" in message and "optim.lr 0.3 -> 0.1" in message
    assert "train.run_name=" in message and "delete that directory" in message
    assert (run_dir / "config.yaml").read_bytes() == before_config
    assert _files(run_dir / "checkpoints") == before_checkpoints
    # longer training, other logging and evaluation settings: the same run, resumed
    summary = pretrain.main(["--config", str(config), "train.max_steps=4", "train.log_every_steps=2",
                             "eval.knn_k=5", "data.num_workers=0"])
    assert summary["steps"] == 4
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2, 4]  # steps 3-4 continue 1-2
    assert "max_steps: 4" in (run_dir / "config.yaml").read_text()


def test_config_changes_lists_every_differing_leaf():
    from selfsup.builders import config_changes

    old = {"a": {"b": 1, "c": [1, 2]}, "d": 3}
    new = {"a": {"b": 1, "c": [1, 3], "e": 0}, "d": 3}
    assert config_changes(old, new) == [("a.c", [1, 2], [1, 3]), ("a.e", "<unset>", 0)]


VIT = {"name": "vit_tiny_patch4", "kwargs": {"depth": 1, "embed_dim": 48, "num_heads": 2}}


@pytest.mark.parametrize("size", [16, 18, 20, 22])
def test_an_image_size_the_patch_grid_cannot_cover_is_a_config_error(size):
    from selfsup.builders import check_input_size
    from selfsup.config import ConfigError

    backbone = create_backbone(VIT["name"], **VIT["kwargs"], img_size=size)
    with torch.no_grad():  # independent of the check: does timm's grid of 4 px patches cover every pixel?
        tokens = backbone.patch_embed(torch.zeros(1, 3, size, size)).flatten(1, -2).shape[1]
    covered = tokens * 4 * 4 == size * size
    if covered:
        check_input_size(backbone, size, 3)
    else:
        with pytest.raises(ConfigError, match=rf"data.image_size={size} is not a multiple of the patch size 4.*"
                                              rf"backbone.kwargs.img_size={size}.*{size - size % 4} or {size - size % 4 + 4}"):
            check_input_size(backbone, size, 3)


def test_pretraining_at_a_size_the_patch_grid_cannot_cover_stops_before_anything(tmp_path):
    from selfsup.config import ConfigError

    cfg = tiny_config_dict(tmp_path, data={"image_size": 18},
                           backbone={"name": VIT["name"], "kwargs": {**VIT["kwargs"], "img_size": 18}})
    with pytest.raises(ConfigError, match=r"data.image_size=18 .*patch size 4.*use data.image_size .*16 or 20"):
        pretrain.main(["--config", str(write_config(tmp_path, cfg))])
    assert not (tmp_path / "runs" / "tiny").exists()
