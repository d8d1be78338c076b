"""kNN against a brute-force loop; the linear probe (through the engine) on linearly separable features."""

import math

import pytest
import torch
import torch.nn.functional as F

from selfsup.config import from_dict
from selfsup.engine import make_accelerator
from selfsup.evaluation import FeatureDataset, knn_evaluate, knn_predict, linear_probe, topk_accuracy


def brute_force_knn(train, train_labels, test, k, temperature, num_classes):
    """One test sample at a time: cosine to every train sample, sort, vote exp(sim / T)."""
    scores = torch.zeros(len(test), num_classes, dtype=torch.float64)
    for i, q in enumerate(test.double()):
        sims = []
        for j, t in enumerate(train.double()):
            sims.append((float(q @ t / (q.norm() * t.norm())), j))
        sims.sort(reverse=True)
        for sim, j in sims[:k]:
            scores[i, int(train_labels[j])] += math.exp(sim / temperature)
    return scores


@pytest.mark.parametrize("k, test_block, train_block", [(5, 7, 11), (20, 64, 9), (100, 3, 1000)])
def test_knn_matches_brute_force(k, test_block, train_block):
    torch.manual_seed(0)
    train, test = torch.randn(60, 8), torch.randn(17, 8)
    labels = torch.randint(0, 4, (60,))
    got = knn_predict(train, labels, test, k=k, temperature=0.2, num_classes=4,
                      test_block=test_block, train_block=train_block)
    expected = brute_force_knn(train, labels, test, min(k, 60), 0.2, 4)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_knn_evaluate_top1_top5_and_classes():
    torch.manual_seed(1)
    train, test = torch.randn(40, 6), torch.randn(9, 6)
    train_labels, test_labels = torch.randint(0, 7, (40,)), torch.randint(0, 7, (9,))
    got = knn_evaluate(train, train_labels, test, test_labels, k=10, temperature=0.1, num_classes=7)
    scores = brute_force_knn(train, train_labels, test, 10, 0.1, 7)
    top5 = scores.topk(5, dim=1).indices
    assert got["top1"] == pytest.approx(100 * (scores.argmax(1) == test_labels).double().mean().item())
    assert got["top5"] == pytest.approx(100 * (top5 == test_labels[:, None]).any(1).double().mean().item())


def test_topk_accuracy_counts_hits():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 1, 0])
    assert topk_accuracy(scores, labels, ks=(1, 2)) == pytest.approx({"top1": 100 / 3, "top2": 200 / 3})


def test_feature_dataset_takes_engine_keys():
    data = FeatureDataset(torch.arange(12.0).view(6, 2), torch.arange(6))
    assert torch.equal(data[(3, 4)][0], torch.tensor([8.0, 9.0])) and data[2][1] == 2


def separable_features(n, noise_seed, dim=16, classes=4):
    """Gaussian clusters around fixed random centres, far apart relative to their spread."""
    centers = 4.0 * torch.randn(classes, dim, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(n) % classes
    noise = 0.3 * torch.randn(n, dim, generator=torch.Generator().manual_seed(noise_seed))
    return centers[labels] + noise, labels


@pytest.mark.parametrize("optimizer, batch_norm", [("sgd", False), ("lars", True), ("adamw", False)])
def test_linear_probe_separates_separable_features(tmp_path, optimizer, batch_norm):
    train_x, train_y = separable_features(512, noise_seed=1)
    test_x, test_y = separable_features(256, noise_seed=2)
    # LARS moves a weight by lr x 1e-3 x ||w|| (its trust ratio, whatever the weight decay): 10 % a step here
    lr = {"sgd": 0.5, "lars": 100.0, "adamw": 0.05}[optimizer]
    cfg = from_dict({
        "data": {"batch_size": 64, "num_workers": 0},
        "optim": {"name": optimizer, "lr": lr, "lr_scaling": "none", "weight_decay": 0.0, "warmup_epochs": 1},
        "train": {"epochs": 8, "log_every_steps": 10, "output_dir": str(tmp_path), "checkpoint_every_steps": 0},
        "probe": {"batch_norm": batch_norm},
    })
    out = linear_probe(train_x, train_y, test_x, test_y, cfg, make_accelerator(cfg), run_dir=tmp_path / "probe")
    assert out["top1"] > 99.0, out
    assert (tmp_path / "probe" / "metrics.jsonl").is_file()  # trained by the engine, logged like pretraining


def test_pixel_baseline_is_knn_on_the_flattened_eval_images():
    """KNNMonitor.pixels() equals a kNN written here on the stacked, flattened eval-transform tensors."""
    from selfsup.builders import build_labelled_pair
    from selfsup.evaluation import KNNMonitor

    train_set, test_set = build_labelled_pair("synthetic", root=None, image_size=8, in_chans=3, max_train=64,
                                              max_test=32, num_samples=96, num_classes=4)
    monitor = KNNMonitor(train_set, test_set, k=5, temperature=0.1, batch_size=16)

    def stacked(ds):
        images, labels = zip(*(ds[i] for i in range(len(ds))))
        return torch.stack(images).reshape(len(ds), -1), torch.tensor(labels)

    (a, ay), (b, by) = stacked(train_set), stacked(test_set)
    sim = F.normalize(b, dim=1) @ F.normalize(a, dim=1).T  # [M, N] cosine
    top, idx = sim.topk(5, dim=1)
    votes = torch.zeros(len(b), 4).scatter_add_(1, ay[idx], (top / 0.1).exp())
    expected = 100.0 * (votes.argmax(1) == by).float().mean().item()
    assert monitor.pixels()["knn_top1"] == pytest.approx(expected)
    assert monitor.pixels() is monitor.pixels()  # computed once


def test_pretrain_summary_puts_the_encoder_beside_random_init_and_pixels(tmp_path, capsys):
    import pretrain
    from tests.conftest import tiny_config_dict, write_config

    cfg = tiny_config_dict(tmp_path, train={"max_steps": 2},
                           eval={"at_end": True, "random_init_baseline": True, "pixel_baseline": True,
                                 "max_train_samples": 64, "max_test_samples": 32, "knn_k": 5})
    summary = pretrain.main(["--config", str(write_config(tmp_path, cfg))])
    for key in ("knn_top1", "random_init_knn_top1", "pixels_knn_top1"):
        assert 0 <= summary[key] <= 100, key
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("[selfsup] kNN top-1: encoder") and "raw pixels" in line and "random init" in line
    above = summary["knn_top1"] > summary["pixels_knn_top1"]
    assert ("above raw pixels" if above else "raw pixels") in line
