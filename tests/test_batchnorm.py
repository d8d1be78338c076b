"""Split BatchNorm (ghost BN) against a naive per-chunk loop, the demo's running statistics, and plain BN in eval."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from selfsup.batchnorm import SplitBatchNorm, convert_split_batchnorm, shuffle_rows, unshuffle_rows

S = 4  # splits


def split_bn(num_features: int = 3, dim: int = 2, seed: int = 0) -> SplitBatchNorm:
    torch.manual_seed(seed)
    plain = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dim](num_features).double()
    with torch.no_grad():  # non-trivial affine and running statistics to start from
        plain.weight.uniform_(0.5, 1.5), plain.bias.normal_()
        plain.running_mean.normal_(), plain.running_var.uniform_(0.5, 2.0)
    return convert_split_batchnorm(plain, S)


def inputs(shape, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * 3 + torch.arange(shape[1], dtype=torch.float64).view(1, -1, *[1] * (len(shape) - 2))


@pytest.mark.parametrize("shape", [(8, 3, 5, 5), (12, 3)], ids=["2d", "1d"])
def test_train_mode_normalises_each_chunk_alone(shape) -> None:
    """Each chunk of N/S samples, normalised by its own mean and biased variance: the naive loop."""
    bn = split_bn(dim=len(shape) - 2 if len(shape) > 2 else 1)
    x = inputs(shape)
    reduce = [0, *range(2, x.dim())]  # every axis but the channel
    view = (1, -1, *[1] * (x.dim() - 2))
    expected = []
    for chunk in x.chunk(S):  # [N/S, C, *] each
        mean = chunk.mean(dim=reduce, keepdim=True)
        var = chunk.var(dim=reduce, unbiased=False, keepdim=True)
        expected.append((chunk - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(view) + bn.bias.view(view))
    assert_close(bn(x), torch.cat(expected), rtol=1e-12, atol=1e-12)
    # and it is not plain BN over the whole batch
    whole = F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    assert not torch.allclose(bn(x), whole)


def test_running_statistics_are_the_mean_over_the_chunks() -> None:
    """The demo's SplitBatchNorm: each chunk updates its copy r_s = (1 - m) r + m stat_s (unbiased variance),
    then r = mean_s r_s (facebookresearch/moco colab/moco_cifar10_demo.ipynb, cell "Define base encoder")."""
    bn = split_bn()
    mean0, var0, m = bn.running_mean.clone(), bn.running_var.clone(), bn.momentum
    x = inputs((8, 3, 5, 5))
    bn(x)
    chunk_means = torch.stack([c.mean(dim=(0, 2, 3)) for c in x.chunk(S)])  # [S, C]
    chunk_vars = torch.stack([c.transpose(0, 1).reshape(3, -1).var(dim=1, unbiased=True) for c in x.chunk(S)])  # [S, C]
    assert_close(bn.running_mean, ((1 - m) * mean0 + m * chunk_means).mean(dim=0), rtol=1e-12, atol=1e-12)
    assert_close(bn.running_var, ((1 - m) * var0 + m * chunk_vars).mean(dim=0), rtol=1e-12, atol=1e-12)
    assert int(bn.num_batches_tracked) == 1


def test_eval_mode_is_plain_batch_norm_and_the_state_dict_loads_into_it() -> None:
    bn = split_bn()
    bn(inputs((8, 3, 5, 5)))  # moves the running statistics
    plain = nn.BatchNorm2d(3).double()
    plain.load_state_dict(bn.state_dict())  # strict: the same keys as nn.BatchNorm2d
    assert set(bn.state_dict()) == set(plain.state_dict())
    bn.eval(), plain.eval()
    x = inputs((5, 3, 4, 4), seed=3)  # any batch size in eval mode
    assert torch.equal(bn(x), plain(x))


def test_conversion_reaches_every_batch_norm_and_shares_its_tensors() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4 * 36)))
    weight = model[1].weight
    before = model.state_dict()
    convert_split_batchnorm(model, S)
    assert isinstance(model[1], SplitBatchNorm) and isinstance(model[2][1], SplitBatchNorm)
    assert model[1].weight is weight and model[1].num_splits == S
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()) and set(before) == set(model.state_dict())


def test_batch_not_divisible_by_the_splits_is_refused() -> None:
    with pytest.raises(ValueError, match="num_splits=4 needs a batch divisible by 4, got N=6"):
        split_bn()(inputs((6, 3, 2, 2)))


def test_shuffle_rows_is_a_permutation_and_unshuffle_undoes_it() -> None:
    x = torch.arange(16 * 3, dtype=torch.float64).view(16, 3)  # row i holds sample i
    torch.manual_seed(0)
    shuffled, permutation = shuffle_rows(x)
    assert sorted(permutation.tolist()) == list(range(16)) and not torch.equal(permutation, torch.arange(16))
    assert torch.equal(shuffled, x[permutation])
    assert torch.equal(unshuffle_rows(shuffled * 2 + 1, permutation), x * 2 + 1)  # f(x) back in input order


def test_global_batchnorm_alone_is_plain_batchnorm_and_keeps_its_keys():
    """Without a process group the global BN is nn.BatchNorm (train: outputs, grads, running stats; eval)."""
    from selfsup.batchnorm import GlobalBatchNorm, convert_global_batchnorm

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None)).double()
    converted = convert_global_batchnorm(copy.deepcopy(plain))
    assert isinstance(converted[1], GlobalBatchNorm) and converted.state_dict().keys() == plain.state_dict().keys()
    for _ in range(2):
        x = torch.randn(6, 3, 5, 5, dtype=torch.float64)
        out, ref = converted(x), plain(x)
        torch.testing.assert_close(out, ref)
        out.square().sum().backward(), ref.square().sum().backward()
    torch.testing.assert_close(converted[0].weight.grad, plain[0].weight.grad)
    torch.testing.assert_close(converted[1].running_var, plain[1].running_var)
    converted.eval(), plain.eval()
    torch.testing.assert_close(converted(x), plain(x))
