from pathlib import Path

import pytest
import yaml

from selfsup.config import ConfigError, OptimConfig, load_config, save_config, to_dict


def write(tmp_path, data, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_and_sections(tmp_path):
    cfg = load_config(write(tmp_path, {"method": {"name": "simclr", "temperature": 0.5}}))
    assert cfg.method.name == "simclr" and cfg.method.temperature == 0.5
    assert cfg.optim == OptimConfig(name="lars", lr=0.3, weight_decay=1e-6)  # SimCLR's recipe (no optim section)
    assert cfg.source.endswith("run.yaml")


def test_overrides_apply_with_types(tmp_path):
    path = write(tmp_path, {"optim": {"lr": 0.1}, "train": {"epochs": 3}})
    cfg = load_config(
        path,
        ["optim.lr=1e-3", "train.epochs=5", "train.clip_grad=1", "backbone.kwargs.img_size=28",
         "data.views.blur_p=[1.0, 0.1]", "optim.betas=[0.9, 0.95]", "method.temperature=0.3", "data.subset=null"],
    )
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.train.epochs == 5
    assert cfg.train.clip_grad == 1.0 and isinstance(cfg.train.clip_grad, float)
    assert cfg.backbone.kwargs == {"img_size": 28}
    assert cfg.data.views["blur_p"] == [1.0, 0.1]
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.method.temperature == 0.3
    assert cfg.data.subset is None
    assert load_config(path, ["train.precision=no"]).train.precision == "no"  # not YAML's boolean False


@pytest.mark.parametrize(
    "data, override, key, hint",
    [
        ({"optim": {"lrr": 0.1}}, None, "optim.lrr", "optim.lr"),
        ({}, "train.epoch=3", "train.epoch", "train.epochs"),
        ({"trian": {}}, None, "trian", "train"),
        ({"method": {"name": "simclr", "temprature": 0.1}}, None, "method.temprature", "method.temperature"),
    ],
)
def test_unknown_key_names_key_and_closest(tmp_path, data, override, key, hint):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, data), [override] if override else [])
    assert f"'{key}'" in str(err.value) and f"Did you mean '{hint}'" in str(err.value)


@pytest.mark.parametrize(
    "override, key",
    [("train.epochs=abc", "train.epochs"), ("optim.lr=fast", "optim.lr"), ("train.compile=3", "train.compile"),
     ("optim.betas=[0.9]", "optim.betas"), ("data.batch_size=1.5", "data.batch_size")],
)
def test_wrong_type_names_key_and_expected_type(tmp_path, override, key):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, {}), [override])
    assert key in str(err.value)


def test_unknown_method_and_bad_override_syntax(tmp_path):
    with pytest.raises(ValueError, match="simclr"):
        load_config(write(tmp_path, {"method": {"name": "simclrr"}}))
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(write(tmp_path, {}), ["optim.lr"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, {"method": {"name": "simclr"}}), ["optim.lr=0.5", "data.views.flip_p=0.0"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert to_dict(again) == to_dict(cfg)
    assert again.optim.lr == 0.5 and again.data.views == {"flip_p": 0.0}


@pytest.mark.parametrize(
    "method, owner",
    [({"name": "simclr", "queue_size": 4096, "variant": "v2"}, "moco"),
     ({"name": "simclr", "mask_ratio": 0.75, "norm_pix_loss": True}, "mae")],
)
def test_keys_of_another_method_name_that_method(tmp_path, method, owner):
    """A config written for one method but run with another's name says which method it belongs to."""
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, {"method": method}))
    assert f"looks like a config for method {owner}" in str(err.value) and "method.name" in str(err.value)


CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml")
                 if "accelerate" not in p.parts)  # configs/accelerate/: Accelerate's launch configs (tests/test_fsdp.py)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_loads(path):
    """Each file in configs/ passes validation as shipped (a renamed key would break it here, not in a run)."""
    cfg = load_config(path)
    stem = path.stem
    assert cfg.method.name in stem or cfg.method.name == "simclr", (stem, cfg.method.name)


@pytest.mark.parametrize(
    "method, backbone, expected",
    [({"name": "moco", "variant": "v3"}, {"name": "vit_tiny_patch4", "kwargs": {"img_size": 28}},
      {"name": "adamw", "lr": 1.5e-4, "weight_decay": 0.1}),
     ({"name": "moco", "variant": "v3"}, {"name": "resnet18_small"}, {"name": "lars", "lr": 0.6, "weight_decay": 1e-6}),
     ({"name": "moco"}, {"name": "resnet18_small"}, {"name": "sgd", "lr": 0.03, "weight_decay": 1e-4}),
     ({"name": "simclr"}, {"name": "resnet18_small"}, {"name": "lars", "lr": 0.3, "weight_decay": 1e-6}),
     ({"name": "mae"}, {"name": "vit_tiny_patch4"}, {"name": "adamw", "lr": 1.5e-4, "betas": (0.9, 0.95)}),
     # microsoft/SimMIM: BASE_LR x batch / 512 with 1e-4 (ViT-B) and 2e-4 (Swin-B), i.e. 5e-5 and 1e-4 per 256
     ({"name": "simmim"}, {"name": "vit_tiny_patch4"},
      {"name": "adamw", "lr": 5e-5, "weight_decay": 0.05, "betas": (0.9, 0.999), "warmup_epochs": 10}),
     ({"name": "simmim"}, {"name": "swin_base_patch4_window6_192"}, {"name": "adamw", "lr": 1e-4, "weight_decay": 0.05})],
)
def test_an_unnamed_optimizer_is_the_methods_recipe(tmp_path, method, backbone, expected):
    cfg = load_config(write(tmp_path, {"method": method, "backbone": backbone}))
    assert cfg.optim.name == expected.pop("name")
    for key, value in expected.items():  # key by key: pytest.approx takes no dict holding a tuple (betas)
        assert getattr(cfg.optim, key) == pytest.approx(value), (key, cfg.optim)


def test_the_recipe_never_overrides_what_the_config_sets(tmp_path):
    vit = {"name": "vit_tiny_patch4", "kwargs": {"img_size": 28}}
    path = write(tmp_path, {"method": {"name": "moco", "variant": "v3"}, "backbone": vit, "optim": {"lr": 1e-3}})
    cfg = load_config(path, ["optim.warmup_epochs=1"])
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_epochs) == ("adamw", 1e-3, 0.1, 1.0)
    named = load_config(path, ["optim.name=sgd"])  # an optimizer named by the user: no recipe at all
    assert (named.optim.name, named.optim.lr, named.optim.weight_decay) == ("sgd", 1e-3, OptimConfig().weight_decay)
    again = tmp_path / "resolved.yaml"  # the run directory's config.yaml states the optimizer that ran
    save_config(cfg, again)
    assert load_config(again).optim == cfg.optim


def test_yaml_syntax_error_is_one_config_error_naming_file_line_and_column(tmp_path):
    """Before: yaml's ScannerError / ParserError escaped load_config (a 60-line traceback from pretrain.py)."""
    path = tmp_path / "broken.yaml"
    path.write_text("data:\n  dataset: synthetic\n  image_size: [32\ntrain:\n  epochs: 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and "line 4, column 6" in message and "started at line 3" in message
    assert "\n" not in message
    path.write_text("data:\n  dataset: synthetic\n   image_size: 32\n")  # indentation
    with pytest.raises(ConfigError, match=r"line 3, column 14"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"optim\.lr=\[1,"):
        load_config(None, ["optim.lr=[1,"])


@pytest.mark.parametrize("lr", ["-0.1", "0", ".nan"])
def test_learning_rate_must_be_positive_named_by_its_key(tmp_path, lr):
    """Before: timm's 'Invalid learning rate: -0.0125', the batch-scaled value with no key."""
    with pytest.raises(ConfigError, match=r"optim\.lr must be > 0") as info:
        load_config(write(tmp_path, {"optim": {"name": "sgd", "lr": 0.1}}), [f"optim.lr={lr}"])
    assert "got" in str(info.value)
    with pytest.raises(ConfigError, match=r"optim\.lr must be > 0"):  # also when the method's recipe fills optim
        load_config(write(tmp_path, {"method": {"name": "simclr"}, "optim": {"lr": -1}}))
