"""train.trackers: a tracker that is not installed stops the run at start (Accelerate alone would warn, drop it
and finish without the logs); the extras that install them."""

from __future__ import annotations

import tomllib

import accelerate.utils
import pytest

from selfsup.config import ConfigError
from selfsup.engine import check_trackers
from tests.conftest import ROOT, tiny_config_dict, write_config


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
def test_a_tracker_that_is_not_installed_stops_before_any_work(tracker, tmp_path, monkeypatch):
    import pretrain

    monkeypatch.setattr(accelerate.utils, f"is_{tracker}_available", lambda: False)
    cfg = tiny_config_dict(tmp_path, train={"trackers": [tracker]})
    with pytest.raises(ConfigError) as caught:
        pretrain.main(["--config", str(write_config(tmp_path, cfg))])
    message = str(caught.value)
    assert f"'{tracker}'" in message and f'pip install "selfsup[{tracker}]"' in message and "\n" not in message
    assert not (tmp_path / "runs").exists()


def test_installed_trackers_pass_and_an_unknown_name_is_named(monkeypatch):
    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: True)
    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: True)
    check_trackers(["tensorboard", "wandb"])
    check_trackers([])
    with pytest.raises(ConfigError, match="'tensorbord' is not an Accelerate tracker.*Did you mean 'tensorboard'"):
        check_trackers(["tensorbord"])


def test_the_extras_name_the_trackers_packages():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["tensorboard"][0].startswith("tensorboard") and extras["wandb"][0].startswith("wandb")
