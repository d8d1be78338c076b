"""The accuracy floor CI enforces (selfsup/regression.py, tools/regression.py): the check fails on a broken
encoder and on one below raw pixels by more than the margin, passes on a good one; the stored floors are complete."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfsup import regression
from selfsup.regression import (
    FAMILIES,
    FLOOR_FILE,
    MACHINE_FIELDS,
    REQUIRED_FIELDS,
    check_family,
    floor_entry,
)

ENTRY = {"floor": 60.0, "random_init_margin": 3.0, "pixels_margin": 14.0, "random_init_knn_top1": 45.0,
         "pixels_knn_top1": 76.0, "runs": [{"knn_top1": 66.0}], "machine": {"cpu_model": "test CPU"}}


def test_good_encoder_passes():
    assert check_family("contrastive", {"knn_top1": 66.0, "random_init_knn_top1": 45.0, "pixels_knn_top1": 76.0},
                        ENTRY) == []


def test_random_weights_fail_floor_and_random_init():
    # a broken encoder (e.g. training no longer updates the weights) scores what random init scores
    broken = {"knn_top1": 45.2, "random_init_knn_top1": 45.0, "pixels_knn_top1": 76.0}
    failures = check_family("contrastive", broken, ENTRY)
    assert len(failures) == 3  # below the floor, not above random init, too far below pixels
    assert any("below the floor 60.0" in f for f in failures)
    assert any("random init" in f and "learned nothing" in f for f in failures)
    assert all("\n" not in f for f in failures)  # one clear line each


def test_not_clearing_random_init_by_the_margin_fails_even_above_the_floor():
    # the same run's random-init figure moved up (e.g. a protocol change): the floor alone would pass it
    result = {"knn_top1": 62.0, "random_init_knn_top1": 60.0, "pixels_knn_top1": 70.0}
    failures = check_family("masked", result, ENTRY)
    assert len(failures) == 1 and "not above the same backbone at random init (60.0 %)" in failures[0]


def test_far_below_raw_pixels_fails():
    # above the floor and random init, but the pixels of the same run sit more than the margin above it
    result = {"knn_top1": 61.0, "random_init_knn_top1": 45.0, "pixels_knn_top1": 80.0}
    failures = check_family("contrastive", result, ENTRY)
    assert len(failures) == 1
    assert "19.0 points below raw pixels (80.0 %), more than the allowed 14.0" in failures[0]
    # within the margin it passes
    assert check_family("contrastive", dict(result, pixels_knn_top1=74.0), ENTRY) == []


def test_stored_baselines_stand_in_when_a_run_has_none():
    assert len(check_family("contrastive", {"knn_top1": 46.0}, ENTRY)) == 3
    assert check_family("contrastive", {}, ENTRY)[0].startswith("contrastive: no kNN top-1")


def test_random_init_encoder_on_a_tiny_synthetic_protocol_fails(tmp_path):
    """Score a real random-init encoder (not made-up figures) and hand it to the check."""
    import torch

    from selfsup.backbones import create_backbone
    from selfsup.builders import build_labelled_pair
    from selfsup.evaluation import KNNMonitor

    train_set, test_set = build_labelled_pair("synthetic", root=None, image_size=16, in_chans=3, max_train=64,
                                              max_test=32, num_samples=96, num_classes=4)
    monitor = KNNMonitor(train_set, test_set, k=10, temperature=0.1, batch_size=64)
    torch.manual_seed(0)
    random_encoder = create_backbone("resnet10_small", channels=[8, 16, 32, 64], stem_width=8)
    torch.manual_seed(0)
    same_init = create_backbone("resnet10_small", channels=[8, 16, 32, 64], stem_width=8)
    result = {"knn_top1": monitor(random_encoder)["knn_top1"],
              "random_init_knn_top1": monitor(same_init)["knn_top1"],
              "pixels_knn_top1": monitor.pixels()["knn_top1"]}
    assert result["knn_top1"] == result["random_init_knn_top1"]
    entry = dict(ENTRY, floor=0.0, pixels_margin=100.0)  # only the random-init rule can catch it here
    failures = check_family("contrastive", result, entry)
    assert len(failures) == 1 and "learned nothing" in failures[0]


def _figures(top1: float, random_init: float = 45.0, pixels: float = 76.0, **extra) -> dict:
    return {"knn_top1": top1, "random_init_knn_top1": random_init, "pixels_knn_top1": pixels, "wall_s": 1.0,
            "cpu_s": 2.0, **extra}


def _floor_file(tmp_path: Path, family: str = "contrastive") -> Path:
    config = FAMILIES[family]
    entry = dict(ENTRY, config=config, config_sha256=regression.file_sha256(regression.ROOT / config))
    path = tmp_path / "floor.json"
    path.write_text(json.dumps({"families": {family: entry}}))
    return path


def test_main_exit_codes_and_one_line_per_failure(tmp_path, capsys):
    floor = _floor_file(tmp_path)
    assert regression.main(["--floor", str(floor)], runner=lambda config, **kw: _figures(66.0)) == 0
    assert "[regression] passed: contrastive" in capsys.readouterr().out

    assert regression.main(["--floor", str(floor)], runner=lambda config, **kw: _figures(45.0)) == 1
    fails = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[regression] FAIL")]
    assert len(fails) == 3 and all(line.startswith("[regression] FAIL contrastive:") for line in fails)


def test_a_run_that_crashes_fails(tmp_path, capsys):
    def crash(config, **kw):
        raise RuntimeError("pretraining configs/regression/simclr.yaml failed (exit 1)")

    assert regression.main(["--floor", str(_floor_file(tmp_path))], runner=crash) == 1
    assert "the run did not finish" in capsys.readouterr().out


def test_a_failing_child_run_is_one_line(tmp_path, capsys):
    # a config whose dataset cannot be found: the real child process fails fast, before training
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {dataset: image_folder, root: /nonexistent/images}\n")
    with pytest.raises(RuntimeError) as info:
        regression.run_family(bad, output_dir=tmp_path / "runs", run_name="bad")
    assert "\n" not in str(info.value) and "failed (exit" in str(info.value)


def test_a_changed_config_needs_a_new_floor(tmp_path, capsys):
    floor = _floor_file(tmp_path)
    data = json.loads(floor.read_text())
    data["families"]["contrastive"]["config_sha256"] = "0" * 64
    floor.write_text(json.dumps(data))
    assert regression.main(["--floor", str(floor)], runner=lambda config, **kw: _figures(66.0)) == 1
    assert "changed since its floor was measured" in capsys.readouterr().out


def test_missing_floor_file_fails(tmp_path, capsys):
    assert regression.main(["--floor", str(tmp_path / "none.json")], runner=lambda c, **kw: _figures(66.0)) == 1


def test_update_floor_sets_the_floor_below_the_lowest_run(tmp_path):
    figures = iter([_figures(66.0, seed=0), _figures(64.0, random_init=46.0, pixels=75.0, seed=1)])
    floor = tmp_path / "floor.json"
    assert regression.main(["--floor", str(floor), "--update-floor", "--family", "contrastive"],
                           runner=lambda config, **kw: next(figures)) == 0
    entry = json.loads(floor.read_text())["families"]["contrastive"]
    assert set(REQUIRED_FIELDS) <= set(entry)
    assert entry["floor"] == 60.0  # 64.0 - max(3, 2 x 2.0 spread) = 60.0
    assert entry["pixels_margin"] == 15.0  # the worst gap to pixels (11.0) + the 4.0 noise
    assert entry["measured"] == 66.0 and entry["random_init_knn_top1"] == 45.0  # the config's seed (CI's run)


def test_floor_needs_two_runs_and_a_clear_gain_over_random_init():
    with pytest.raises(ValueError, match="at least 2 runs"):
        floor_entry(FAMILIES["contrastive"], [_figures(66.0)])
    with pytest.raises(ValueError, match="beats random init by only"):
        floor_entry(FAMILIES["contrastive"], [_figures(49.0, seed=0), _figures(50.0, seed=1)])


def test_stored_floor_has_every_field():
    data = json.loads(FLOOR_FILE.read_text())
    assert data["protocol"]
    assert set(data["families"]) <= set(FAMILIES) and "contrastive" in data["families"]
    for family, entry in data["families"].items():
        assert set(REQUIRED_FIELDS) <= set(entry), family
        assert set(MACHINE_FIELDS) <= set(entry["machine"]), family
        assert entry["config"] == FAMILIES[family]
        assert entry["config_sha256"] == regression.file_sha256(regression.ROOT / entry["config"]), (
            f"{entry['config']} changed since its floor was measured: tools/regression.py --update-floor")
        assert len(entry["runs"]) >= 2
        assert entry["floor"] < min(run["knn_top1"] for run in entry["runs"])  # a safe distance below every run
        assert entry["measured"] - entry["random_init_knn_top1"] > entry["random_init_margin"]
        assert entry["pixels_knn_top1"] - entry["measured"] < entry["pixels_margin"]
        assert entry["machine"]["isa"] and isinstance(entry["machine"]["native_bf16"], bool)
        assert entry["how_chosen"] and entry["date"] and entry["commit"]


@pytest.mark.slow
def test_real_regression_contrastive_end_to_end(tmp_path):
    """The real thing for one family (~3 min on 2 AVX2 cores): pretrain, score, check against the stored floor."""
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("Fashion-MNIST IDX files not installed (apt-get install dataset-fashion-mnist)")
    # run_family gives the child the floor's CPU class (AVX2 caps, no GPU) unless the environment sets it
    assert regression.main(["--family", "contrastive", "--output-dir", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "contrastive" / "summary.json").read_text())
    assert summary["knn_top1"] > summary["random_init_knn_top1"]
