"""Model soups: the uniform soup against a naive loop over the state dicts, the greedy soup on three synthetic
"runs" (two good ones whose errors cancel, one bad one), architecture checks, and the held-out part of the
training split that no run trained on; end to end (slow) on tiny fine-tuning runs."""

import json
from pathlib import Path

import pytest
import torch

from selfsup.config import ConfigError, from_dict
from selfsup.data import SyntheticDataset, _fixed_subset
from selfsup.soup import Ingredient, average_state_dicts, check_same_architecture, greedy_soup
from selfsup.splits import unused_holdout


def test_uniform_soup_is_the_mean_of_the_state_dicts():
    torch.manual_seed(0)
    states = [{"w": torch.randn(3, 2), "b": torch.randn(2).half(), "bn.num_batches_tracked": torch.tensor(5 + i)}
              for i in range(3)]
    soup = average_state_dicts(states)
    for key in ("w", "b"):
        total = torch.zeros_like(states[0][key], dtype=torch.float64)
        for state in states:  # the naive loop
            total += state[key].double()
        assert soup[key].dtype == states[0][key].dtype
        assert torch.allclose(soup[key].double(), (total / 3).to(states[0][key].dtype).double())
    assert soup["bn.num_batches_tracked"].item() == 5  # a counter, not a weight: the first state's


def _accuracy(state, points, labels):
    logits = points @ state["weight"].T + state["bias"]  # [N, 2] @ [2, 2] -> [N, 2]
    return 100.0 * (logits.argmax(dim=1) == labels).float().mean().item()


def test_greedy_soup_keeps_the_good_runs_and_drops_the_bad_one():
    # held-out data: label = [x0 > 0]; the true classifier W* reads x0 alone
    points = torch.randn(400, 2, generator=torch.Generator().manual_seed(0))
    labels = (points[:, 0] > 0).long()
    w_star = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])
    tilt = torch.tensor([[0.0, -0.6], [0.0, 0.6]])  # errors of opposite sign: the average of the two is W*
    states = {"good_a": {"weight": w_star + tilt, "bias": torch.zeros(2)},
              "good_b": {"weight": w_star - tilt, "bias": torch.zeros(2)},
              "bad": {"weight": -3 * w_star, "bias": torch.zeros(2)}}  # averaged in, it flips the decision
    held = {name: _accuracy(state, points, labels) for name, state in states.items()}
    assert held["bad"] < 50 < held["good_b"] < 100 and held["good_a"] < 100
    calls = []

    def score(state):
        calls.append(state)
        return _accuracy(state, points, labels)

    soup = greedy_soup(states, held, score)
    assert sorted(soup.kept) == ["good_a", "good_b"] and soup.holdout_top1 == 100.0
    assert [t["name"] for t in soup.trials] == [n for n in sorted(held, key=held.get, reverse=True)][1:]
    assert [t["kept"] for t in soup.trials] == [True, False]
    assert torch.allclose(soup.state["weight"], w_star)
    assert len(calls) == 2  # one held-out score per candidate after the first; the ingredients' own are given


def _ingredient(name, backbone="resnet10_small", channels=(8, 8, 8, 8), shape=(4, 8)):
    cfg = from_dict({"backbone": {"name": backbone, "kwargs": {"channels": list(channels)}}, "data": {"image_size": 16}})
    return Ingredient(name, Path(name), cfg, {"head.fc.weight": torch.zeros(shape)})


def test_runs_of_different_architectures_raise_one_clear_error():
    check_same_architecture([_ingredient("a"), _ingredient("b")])
    with pytest.raises(ConfigError, match=r"runs a \(resnet10_small.*\) and vit \(vit_tiny_patch4.*different architectures"):
        check_same_architecture([_ingredient("a"), _ingredient("vit", backbone="vit_tiny_patch4")])
    with pytest.raises(ConfigError, match="different architectures"):
        check_same_architecture([_ingredient("a"), _ingredient("wide", channels=(16, 16, 16, 16))])
    with pytest.raises(ConfigError, match="different architectures"):  # same config, other tensors (classes)
        check_same_architecture([_ingredient("a"), _ingredient("k5", shape=(5, 8))])


def test_the_held_out_part_is_training_images_no_run_holds():
    train = SyntheticDataset(100, image_size=8, num_classes=4, seed=0, split="train")
    test = SyntheticDataset(40, image_size=8, num_classes=4, seed=0, split="test")
    runs = [_fixed_subset(train, 30, seed) for seed in (0, 1)]
    held = unused_holdout(runs + [test], 20, seed=0)
    used = set(runs[0].indices) | set(runs[1].indices)
    assert held.dataset is train and len(held) == 20 and not used & set(held.indices)
    assert unused_holdout(runs + [test], 20, seed=0).indices == held.indices  # fixed by the seed
    assert len(unused_holdout(runs, 1000, seed=0)) == 100 - len(used)  # fewer left than asked: all of them
    with pytest.raises(ConfigError, match="--max-train"):
        unused_holdout([train], 20)


@pytest.mark.slow
def test_soup_tool_end_to_end(tmp_path, capsys):
    from selfsup.cli.finetune import main as finetune
    from selfsup.cli.soup import main as soup

    common = ["--encoder", "resnet10_small", "--dataset", "synthetic", "--image-size", "16", "--max-train", "64",
              "--max-test", "32", "--epochs", "1", "backbone.kwargs={channels: [8, 8, 8, 8], stem_width: 8}",
              "data.batch_size=32", "data.num_workers=0", "train.precision=no", f"train.output_dir={tmp_path}"]
    runs = [finetune(common + ["--seed", str(seed), "--ema-decay", "0.9", f"train.run_name=s{seed}"]) for seed in (0, 1)]
    out = soup(["--runs", *(r["run_dir"] for r in runs), "--holdout", "48", "--output", str(tmp_path / "soup.json")])
    written = json.loads((tmp_path / "soup.json").read_text())
    assert written == json.loads(json.dumps(out))
    names = [row["name"] for row in written["rows"]]
    assert names == ["s0", "s1", "uniform soup", "greedy soup"] and written["holdout_size"] == 48
    assert set(written["greedy_kept"]) <= {"s0", "s1"} and written["batch_norm_recomputed"]
    printed = capsys.readouterr().out
    assert "greedy soup" in printed and "kept:" in printed
    assert soup(["--runs", *(r["run_dir"] for r in runs), "--weights", "ema", "--holdout", "16",
                 "--output", str(tmp_path / "ema.json")])["weights"] == "ema"
    with pytest.raises(SystemExit, match="no SWA weights"):
        soup(["--runs", *(r["run_dir"] for r in runs), "--weights", "swa"])
    other = finetune(common + ["--seed", "2", "train.run_name=wide", "backbone.kwargs={channels: [16, 16, 16, 16], stem_width: 8}"])
    with pytest.raises(SystemExit, match="different architectures"):
        soup(["--runs", runs[0]["run_dir"], other["run_dir"]])
