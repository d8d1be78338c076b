"""EpochSampler and ViewDataset: (seed, epoch)-seeded order and (seed, epoch, index)-seeded views."""

import numpy as np
import torch
from torch.utils.data import DataLoader

from selfsup.data import build_dataset
from selfsup.sampling import EpochSampler, ViewDataset


def test_epoch_sampler_permutations():
    sampler = EpochSampler(100, seed=7)
    first = list(sampler)
    assert {epoch for epoch, _ in first} == {0}
    order0 = [index for _, index in first]
    assert sorted(order0) == list(range(100)) and order0 != list(range(100))
    assert len(sampler) == 100
    sampler.set_epoch(1)
    order1 = [index for epoch, index in sampler]
    assert sorted(order1) == list(range(100)) and order1 != order0
    assert {epoch for epoch, _ in sampler} == {1}
    again = EpochSampler(100, seed=7)
    again.set_epoch(1)
    assert [index for _, index in again] == order1
    assert [index for _, index in EpochSampler(100, seed=8)] != order0
    assert list(EpochSampler(5, shuffle=False)) == [(0, i) for i in range(5)]


class _RandomTransform:
    """Output depends only on the torch RNG state, so it exposes the seeding."""

    def __call__(self, image):
        return torch.rand(4) + torch.tensor(float(np.asarray(image).mean()))


def test_view_dataset_seeds_per_key():
    base = build_dataset("synthetic", num_samples=8, image_size=8)
    views = ViewDataset(base, _RandomTransform(), seed=1)
    assert len(views) == 8 and views.num_classes == 10
    torch.manual_seed(123)
    a, label = views[(2, 5)]
    outside = torch.rand(1)
    torch.manual_seed(999)  # a different global state must not matter
    b, _ = views[(2, 5)]
    torch.testing.assert_close(a, b)
    assert label == base[5][1]
    # The caller's random stream is untouched by fork_rng.
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), outside)
    assert not torch.equal(views[(3, 5)][0], a)  # next epoch, new views
    assert not torch.equal(views[(2, 6)][0], a)
    assert not torch.equal(ViewDataset(base, _RandomTransform(), seed=2)[(2, 5)][0], a)
    torch.testing.assert_close(views[4][0], views[(0, 4)][0])  # plain index = epoch 0


def test_view_dataset_independent_of_workers_and_batching():
    base = build_dataset("synthetic", num_samples=12, image_size=8)
    views = ViewDataset(base, _RandomTransform())
    sampler = EpochSampler(12, seed=0)
    sampler.set_epoch(3)
    order = [index for _, index in sampler]

    def run(**loader_kwargs):
        loader = DataLoader(views, sampler=sampler, **loader_kwargs)
        return torch.cat([x for x, _ in loader])

    serial = run(batch_size=4, num_workers=0)
    parallel = run(batch_size=3, num_workers=2)
    torch.testing.assert_close(serial, parallel)
    expected = torch.stack([views[(3, i)][0] for i in order])
    torch.testing.assert_close(serial, expected)
