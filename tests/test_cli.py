"""The command-line programs: `--help` before any heavy import (no timing asserted: the
test is that torch, timm, accelerate and torchvision are not imported), `--print-config`, console scripts declared in
pyproject.toml, and (slow) a non-editable install that provides them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib

import pytest
import yaml

from tests.conftest import ROOT

HEAVY = ("torch", "timm", "accelerate", "torchvision")
COMMANDS = {  # console script -> module; the checkout's script
    "selfsup-pretrain": ("selfsup.cli.pretrain", "pretrain.py"),
    "selfsup-knn": ("selfsup.cli.knn", "tools/knn.py"),
    "selfsup-linear-probe": ("selfsup.cli.linear_probe", "tools/linear_probe.py"),
    "selfsup-finetune": ("selfsup.cli.finetune", "tools/finetune.py"),
    "selfsup-benchmark": ("selfsup.cli.benchmark", "tools/benchmark.py"),
    "selfsup-report": ("selfsup.cli.report", "tools/report.py"),
    "selfsup-soup": ("selfsup.cli.soup", "tools/soup.py"),
}
NO_CONFIG = ("selfsup-report", "selfsup-soup")  # they read run directories, not a config
# Runs a module or script as __main__ and, at exit (argparse exits after --help), reports what was imported.
PROBE = """
import atexit, json, runpy, sys
kind, target, *argv = sys.argv[1:]
atexit.register(lambda: print("MODULES " + json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {heavy}))))
sys.argv = [target, *argv]
runpy.run_module(target, run_name="__main__") if kind == "module" else runpy.run_path(target, run_name="__main__")
""".replace("{heavy}", repr(set(HEAVY)))


def probe(kind: str, target: str, *argv: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", PROBE, kind, target, *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    marker = [line for line in proc.stdout.splitlines() if line.startswith("MODULES ")]
    assert marker, proc.stdout + proc.stderr
    return proc, json.loads(marker[-1][len("MODULES "):])


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("kind", ["module", "script"])
def test_help_imports_no_heavy_library(command, kind):
    module, script = COMMANDS[command]
    proc, loaded = probe(kind, module if kind == "module" else script, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout
    assert ("--print-config" in proc.stdout) == (command not in NO_CONFIG)
    assert loaded == [], f"{command} --help imported {loaded}"


def test_a_missing_argument_fails_before_heavy_imports():
    proc, loaded = probe("module", "selfsup.cli.knn")  # --encoder is required
    assert proc.returncode == 2 and "--encoder" in proc.stderr and loaded == []


@pytest.mark.parametrize("command", ["selfsup-pretrain", "selfsup-benchmark"])
def test_print_config_prints_the_resolved_config(command, tmp_path):
    # (resolving a config asks timm whether the backbone is a ViT, so torch is imported here: only --help is light)
    from selfsup.config import load_config, to_dict

    config = ROOT / "configs" / "quickstart.yaml"
    proc, loaded = probe("module", COMMANDS[command][0], "--print-config", "--config", str(config),
                         "optim.lr=0.123", "train.max_steps=7")
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout.split("MODULES ")[0])
    expected = to_dict(load_config(config, ["optim.lr=0.123", "train.max_steps=7"]))
    assert printed == expected and printed["optim"]["lr"] == 0.123 and printed["train"]["max_steps"] == 7


def test_print_config_rejects_a_bad_key_naming_it():
    proc, _ = probe("module", "selfsup.cli.pretrain", "--print-config", "--config",
                    str(ROOT / "configs" / "quickstart.yaml"), "optim.lrr=1")
    assert proc.returncode == 1 and "Unknown config key 'optim.lrr'. Did you mean 'optim.lr'?" in proc.stderr


def test_tool_print_config_layers_recipe_encoder_record_and_overrides(tmp_path, capsys):
    from selfsup.cli import finetune

    printed = finetune.main(["--encoder", "resnet18_small", "--dataset", "synthetic", "--image-size", "16",
                             "--mode", "frozen", "optim.lr=0.25", "--print-config"])
    out = yaml.safe_load(capsys.readouterr().out)
    assert out == printed
    assert out["finetune"]["mode"] == "frozen" and out["optim"]["lr"] == 0.25 and out["optim"]["name"] == "adamw"
    assert out["data"]["image_size"] == 16 and not (tmp_path / "runs").exists()


def test_console_scripts_point_at_the_cli_functions():
    import importlib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == set(COMMANDS)
    for name, target in scripts.items():
        module, function = target.split(":")
        assert module == COMMANDS[name][0] and function == "cli"
        assert callable(getattr(importlib.import_module(module), function))


@pytest.mark.slow
def test_non_editable_install_provides_the_commands(tmp_path):
    """pip install (not editable) into a venv that sees this machine's torch; then the commands run from anywhere."""
    venv = tmp_path / "venv"
    # --without-pip: the venv's bundled setuptools (older, no bdist_wheel without `wheel`) would shadow this
    # machine's; its python still runs this machine's pip from the system site-packages, installing into the venv
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=300)
    bin_dir = venv / "bin"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    install = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                              "--no-index", "--quiet", str(ROOT)], env=env, capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout + install.stderr
    where = subprocess.run([str(bin_dir / "python"), "-c", "import selfsup, sys; print(selfsup.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert str(venv) in where.stdout, where.stdout + where.stderr  # the installed copy, not the checkout
    for command in COMMANDS:
        assert (bin_dir / command).is_file(), command
    helped = subprocess.run([str(bin_dir / "selfsup-knn"), "--help"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert helped.returncode == 0 and "usage: selfsup-knn" in helped.stdout, helped.stderr
    printed = subprocess.run([str(bin_dir / "selfsup-pretrain"), "--print-config", "--config",
                              str(ROOT / "configs" / "quickstart.yaml")], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr
    assert yaml.safe_load(printed.stdout)["method"]["name"] == "simclr"


# --- failures: one line without --debug, the traceback with it; exit statuses ---------------------------------


def run_module(module: str, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("debug", [False, True])
def test_pretrain_prints_one_line_for_a_config_mistake_and_the_traceback_under_debug(debug):
    proc = run_module("selfsup.cli.pretrain", "--config", str(ROOT / "configs" / "quickstart.yaml"), "optim.lrr=1",
                      *(["--debug"] if debug else []))
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    if debug:
        assert "Traceback (most recent call last)" in proc.stderr and "ConfigError: Unknown config key 'optim.lrr'" in proc.stderr
    else:
        assert len(lines) == 1 and lines[0].startswith("error: Unknown config key 'optim.lrr'. Did you mean 'optim.lr'?"), proc.stderr


def test_an_argument_error_exits_2():
    from selfsup.cli import pretrain

    with pytest.raises(SystemExit) as caught:
        pretrain.cli(["--no-such-flag"])
    assert caught.value.code == 2


@pytest.mark.parametrize("tool", ["knn", "linear_probe", "finetune"])
def test_tools_exit_with_one_line_and_raise_under_debug(tool, tmp_path):
    import importlib

    main = importlib.import_module(f"selfsup.cli.{tool}").main
    args = ["--encoder", str(tmp_path / "missing" / "encoder"), f"train.output_dir={tmp_path}"]
    with pytest.raises(SystemExit) as caught:
        main(args)
    assert isinstance(caught.value.code, str) and caught.value.code.startswith("error: --encoder ")
    assert "\n" not in caught.value.code
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(args + ["--debug"])


def _failures():
    from selfsup.checkpoints import CheckpointLoadError
    from selfsup.data import BrokenImageError
    from selfsup.engine import NonFiniteLossError, TrainingInterrupted
    from selfsup.export import EncoderLoadError

    return {  # raised -> (exit status, what stderr / the SystemExit says)
        "sigint": (TrainingInterrupted("SIGINT", "runs/x/checkpoints/step_3"), 130, "stopped: SIGINT received"),
        "sigterm": (TrainingInterrupted("SIGTERM", "runs/x/checkpoints/step_3"), 143, "stopped: SIGTERM received"),
        "ctrl_c_before_training": (KeyboardInterrupt(), 130, "stopped: interrupted (Ctrl-C)"),
        "nonfinite": (NonFiniteLossError("loss is nan at step 3\n  fix: lower optim.lr"), 1,
                      "error: loss is nan at step 3 fix: lower optim.lr"),
        "encoder": (EncoderLoadError("no encoder in x"), 1, "error: no encoder in x"),
        "image": (BrokenImageError("a.png", OSError("truncated")), 1, "error: "),
        "checkpoint": (CheckpointLoadError("no checkpoint in x can be loaded"), 1, "error: no checkpoint in x"),
        "missing_file": (FileNotFoundError("data/x not found"), 1, "error: data/x not found"),
        "config": (ValueError("data.image_size must be > 0"), 1, "error: data.image_size must be > 0"),
    }


@pytest.mark.parametrize("case", ["sigint", "sigterm", "ctrl_c_before_training", "nonfinite", "encoder", "image",
                                  "checkpoint", "missing_file", "config"])
@pytest.mark.parametrize("debug", [False, True])
def test_pretrain_cli_exit_status_and_message_of_each_known_failure(case, debug, monkeypatch, capsys):
    from selfsup.cli import pretrain

    error, status, text = _failures()[case]

    def fail(argv):
        raise error

    monkeypatch.setattr(pretrain, "main", fail)
    argv = ["--config", "x.yaml"] + (["--debug"] if debug else [])
    if debug and status == 1:  # a mistake under --debug: its own traceback
        with pytest.raises(type(error)):
            pretrain.cli(argv)
        return
    with pytest.raises(SystemExit) as caught:
        pretrain.cli(argv)
    err = capsys.readouterr().err
    if status == 1:  # sys.exit(message): Python prints it on stderr and exits 1
        assert isinstance(caught.value.code, str) and caught.value.code.startswith(text) and "\n" not in caught.value.code
    else:
        assert caught.value.code == status and text in err
        assert ("Traceback (most recent call last)" in err) == debug


def test_pretrain_cli_lets_a_bug_raise(monkeypatch):
    from selfsup.cli import pretrain

    def fail(argv):
        raise RuntimeError("a bug")

    monkeypatch.setattr(pretrain, "main", fail)
    with pytest.raises(RuntimeError, match="a bug"):
        pretrain.cli(["--config", "x.yaml"])
