"""info_nce / nt_xent against a naive per-anchor loop with explicit cosine similarities."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import Tensor
from torch.testing import assert_close

from selfsup.losses import info_nce, nt_xent

C = 7


def cosine(u: Tensor, v: Tensor) -> Tensor:
    return (u * v).sum() / (u.norm() * v.norm())


def naive_term(anchor: Tensor, positive: Tensor, candidates: list[Tensor], t: float) -> Tensor:
    """-log(exp(s_pos / t) / sum_candidates exp(s / t)); `candidates` includes the positive."""
    numerator = torch.exp(cosine(anchor, positive) / t)
    denominator = sum(torch.exp(cosine(anchor, c) / t) for c in candidates)
    return -torch.log(numerator / denominator)


def naive_simclr_terms(z1: Tensor, z2: Tensor, t: float) -> list[Tensor]:
    """SimCLR Eq. 1 per anchor: 2N views, positive is the other view, denominator over the 2N-1 others."""
    views = list(torch.cat([z1, z2]))
    n = z1.shape[0]
    terms = []
    for a in range(2 * n):
        positive = views[(a + n) % (2 * n)]
        others = [views[b] for b in range(2 * n) if b != a]
        terms.append(naive_term(views[a], positive, others, t))
    return terms


def rand(*shape: int, seed: int, grad: bool = False) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)


def grads(loss: Tensor, *inputs: Tensor) -> tuple[Tensor, ...]:
    return torch.autograd.grad(loss, inputs)


# --- info_nce ---------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0.07, 0.5, 2.0])
def test_info_nce_in_batch_matches_naive(t: float) -> None:
    q, k = rand(5, C, seed=0, grad=True), rand(5, C, seed=1, grad=True)
    loss = info_nce(q, k, temperature=t)
    naive = torch.stack([naive_term(q[i], k[i], list(k), t) for i in range(5)]).mean()
    assert_close(loss, naive)
    assert_close(grads(loss, q, k), grads(naive, q, k))


def test_info_nce_more_keys_than_queries_defaults_to_diagonal_positive() -> None:
    q, k = rand(3, C, seed=2, grad=True), rand(8, C, seed=3, grad=True)  # M = 8 > N = 3
    loss = info_nce(q, k, temperature=0.2)
    naive = torch.stack([naive_term(q[i], k[i], list(k), 0.2) for i in range(3)]).mean()
    assert_close(loss, naive)
    assert_close(grads(loss, q, k), grads(naive, q, k))


def test_info_nce_negative_bank_matches_naive() -> None:
    q, k = rand(4, C, seed=4, grad=True), rand(4, C, seed=5, grad=True)
    bank = rand(9, C, seed=6, grad=True)  # K = 9
    loss = info_nce(q, k, bank, temperature=0.2)
    naive = torch.stack([naive_term(q[i], k[i], [k[i], *bank], 0.2) for i in range(4)]).mean()
    assert_close(loss, naive)
    assert_close(grads(loss, q, k, bank), grads(naive, q, k, bank))


def test_info_nce_positive_and_exclude_index() -> None:
    n, m, t = 4, 10, 0.3
    q, k = rand(n, C, seed=7, grad=True), rand(m, C, seed=8, grad=True)
    positive_index = torch.tensor([7, 0, 3, 9])
    exclude_index = torch.tensor([2, 5, 4, 0])
    loss = info_nce(q, k, temperature=t, positive_index=positive_index, exclude_index=exclude_index)
    terms = []
    for i in range(n):
        candidates = [k[j] for j in range(m) if j != exclude_index[i]]
        terms.append(naive_term(q[i], k[positive_index[i]], candidates, t))
    naive = torch.stack(terms).mean()
    assert_close(loss, naive)
    assert_close(grads(loss, q, k), grads(naive, q, k))


def test_info_nce_without_normalize_uses_dot_products() -> None:
    q, k = rand(3, C, seed=9), rand(5, C, seed=10)
    logits = q @ k.T / 0.5  # [N, M]
    expected = -(logits.diagonal() - logits.logsumexp(dim=1)).mean()
    assert_close(info_nce(q, k, temperature=0.5, normalize=False), expected)


def test_temperature_scaling() -> None:
    q, k = rand(6, C, seed=11), rand(6, C, seed=12)
    # Without normalisation, dividing the logits by tau is the same as scaling the query by 1/tau.
    assert_close(info_nce(q, k, temperature=0.25, normalize=False), info_nce(q * 4, k, temperature=1.0, normalize=False))
    # Large tau flattens the softmax towards uniform: loss -> log(M).
    assert_close(info_nce(q, k, temperature=1e6), torch.tensor(math.log(6), dtype=torch.float64), atol=1e-4, rtol=0)
    # With positives aligned, lowering tau sharpens the softmax onto them: the loss falls to 0.
    aligned = [info_nce(q, q + 0.01 * k, temperature=t).item() for t in (1.0, 0.3, 0.1, 0.03)]
    assert aligned == sorted(aligned, reverse=True) and aligned[-1] < 1e-3
    with pytest.raises(ValueError, match="temperature"):
        info_nce(q, k, temperature=0.0)


def test_logits_in_float32_under_autocast() -> None:
    q, k = rand(4, C, seed=13).float(), rand(4, C, seed=14).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = info_nce(q, k, temperature=0.05)
    assert loss.dtype == torch.float32
    assert_close(loss, info_nce(q, k, temperature=0.05))
    half = info_nce(q.bfloat16(), k.bfloat16(), temperature=0.05)  # half inputs are promoted, too
    assert half.dtype == torch.float32


# --- nt_xent ----------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0.1, 0.5])
def test_nt_xent_matches_naive_simclr(t: float) -> None:
    z1, z2 = rand(5, C, seed=15, grad=True), rand(5, C, seed=16, grad=True)
    loss = nt_xent(z1, z2, temperature=t)
    naive = torch.stack(naive_simclr_terms(z1, z2, t)).mean()
    assert_close(loss, naive)
    assert_close(grads(loss, z1, z2), grads(naive, z1, z2))


@pytest.mark.parametrize("offset", [0, 2, 4])
def test_nt_xent_slice_of_bigger_batch_matches_full_batch_terms(offset: int) -> None:
    """What one process computes from gathered views: its anchors' terms of the full-batch loss."""
    m, n, t = 6, 2, 0.5
    z1_all, z2_all = rand(m, C, seed=17, grad=True), rand(m, C, seed=18, grad=True)
    z1, z2 = z1_all[offset : offset + n], z2_all[offset : offset + n]  # local rows, same graph
    loss = nt_xent(z1, z2, temperature=t, z1_all=z1_all, z2_all=z2_all, offset=offset)
    terms = naive_simclr_terms(z1_all, z2_all, t)
    local = [*range(offset, offset + n), *range(m + offset, m + offset + n)]  # anchors z1[i], z2[i]
    naive = torch.stack([terms[a] for a in local]).mean()
    assert_close(loss, naive)
    assert_close(grads(loss, z1_all, z2_all), grads(naive, z1_all, z2_all))


def test_slices_average_to_full_batch_loss() -> None:
    m, n = 6, 3
    z1, z2 = rand(m, C, seed=19), rand(m, C, seed=20)
    parts = [nt_xent(z1[o : o + n], z2[o : o + n], z1_all=z1, z2_all=z2, offset=o) for o in (0, n)]
    assert_close(torch.stack(parts).mean(), nt_xent(z1, z2))


def test_identical_views_give_lower_loss_than_random_views() -> None:
    z1, z2 = rand(16, C, seed=21), rand(16, C, seed=22)
    assert nt_xent(z1, z1.clone()) < nt_xent(z1, z2)
    assert info_nce(z1, z1.clone()) < info_nce(z1, z2)


# --- errors -----------------------------------------------------------------------------------


def raises_naming(*shapes: tuple[int, ...]):
    """pytest.raises(ValueError) whose message names every given shape."""
    return pytest.raises(ValueError, match="(?s)" + ".*".join(re.escape(str(s)) for s in shapes))


def test_shape_errors_name_the_shapes() -> None:
    q = torch.randn(4, 8)
    with raises_naming((4, 8, 1)):
        info_nce(torch.randn(4, 8, 1), q)
    with raises_naming((4, 8), (4, 6)):
        info_nce(q, torch.randn(4, 6))  # C mismatch
    with raises_naming((4, 8), (3, 8)):
        info_nce(q, torch.randn(3, 8))  # fewer keys than queries
    with raises_naming((4, 8), (5, 8)):
        info_nce(q, torch.randn(5, 8), torch.randn(10, 8))  # bank: key must be [N, C]
    with raises_naming((4, 8), (10, 6)):
        info_nce(q, torch.randn(4, 8), torch.randn(10, 6))  # bank C mismatch
    with raises_naming((3,)):
        info_nce(q, torch.randn(6, 8), positive_index=torch.arange(3))
    with pytest.raises(ValueError, match=r"\[0, M=6\)"):
        info_nce(q, torch.randn(6, 8), exclude_index=torch.tensor([0, 1, 2, 6]))
    with pytest.raises(ValueError, match="in-batch"):
        info_nce(q, q, torch.randn(10, 8), positive_index=torch.arange(4))


def test_nt_xent_shape_errors_name_the_shapes() -> None:
    z = torch.randn(4, 8)
    with raises_naming((4, 8), (3, 8)):
        nt_xent(z, torch.randn(3, 8))
    with pytest.raises(ValueError, match="both"):
        nt_xent(z, z, z1_all=torch.randn(8, 8))
    with raises_naming((8, 8), (8, 5)):
        nt_xent(z, z, z1_all=torch.randn(8, 8), z2_all=torch.randn(8, 5))
    with raises_naming((4, 8), (8, 5)):
        nt_xent(z, z, z1_all=torch.randn(8, 5), z2_all=torch.randn(8, 5))
    with raises_naming((4, 8), (8, 8)):
        nt_xent(z, z, z1_all=torch.randn(8, 8), z2_all=torch.randn(8, 8), offset=6)  # 6 + 4 > 8
    with pytest.raises(ValueError, match="offset"):
        nt_xent(z, z, offset=1)
