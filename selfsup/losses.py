"""Self-supervised objectives shared by the methods, as pure tensor functions.

`info_nce` is the one contrastive cross-entropy (van den Oord et al. 2018, Eq. 4; MoCo Eq. 1);
`nt_xent` is SimCLR's 2N-view form of it (Chen et al. 2020, Eq. 1). They never gather across
processes or own a queue: callers pass gathered keys (`selfsup.distributed.gather_with_grad`) or
a negative bank explicitly, so the math stays testable on one CPU. No library offers these with
explicit gathered-candidate indexing, so they are written by hand.

The non-contrastive objectives follow the same rule: `byol_loss` (Grill et al. 2020, Eq. 2),
`barlow_twins_loss` (Zbontar et al. 2021, Eqs. 1-2) and `vicreg_terms` / `vicreg_loss` (Bardes et al.
2022, Eqs. 1-6). The last two are statistics over the batch they are given: a multi-process caller
passes the rows of every process (`gather_with_grad`), so the cross-correlation, variance and
covariance are those of the global batch. All compute in >= float32 even under autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["flood", "info_nce", "nt_xent", "self_distillation", "masked_self_distillation", "byol_loss",
           "cross_correlation", "barlow_twins_loss", "vicreg_terms", "vicreg_loss"]


def _check_matrix(name: str, x: Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be a [rows, C] matrix, got shape {tuple(x.shape)}")


def _check_index(name: str, index: Tensor, n: int, m: int) -> None:
    """Shape/dtype always; values only on CPU, where checking costs no device sync."""
    if index.shape != (n,):
        raise ValueError(f"{name} must have shape [N]=({n},), got {tuple(index.shape)}")
    if index.dtype != torch.long:
        raise ValueError(f"{name} must be a torch.long tensor, got {index.dtype}")
    if index.device.type == "cpu" and n > 0 and (index.min() < 0 or index.max() >= m):
        raise ValueError(
            f"{name} values must lie in [0, M={m}), got range [{int(index.min())}, {int(index.max())}]"
        )


def info_nce(
    query: Tensor,
    key: Tensor,
    negatives: Tensor | None = None,
    temperature: float = 0.1,
    *,
    positive_index: Tensor | None = None,
    exclude_index: Tensor | None = None,
    normalize: bool = True,
) -> Tensor:
    """Contrastive cross-entropy: each query must pick its positive out of its candidates.

    Without `negatives`, `key` is `[M, C]` (e.g. keys gathered from every process) and every key
    other than query i's positive `key[positive_index[i]]` (default `i`) is a negative;
    `exclude_index[i]` removes one candidate from query i's softmax (its own copy in NT-Xent).
    With `negatives` `[K, C]` (an explicit bank such as MoCo's queue), `key` is `[N, C]`, one
    positive per query. Logits are computed in float32 (or float64) even under autocast, since
    exp(s / tau) with small tau overflows half precision. Returns the mean over the N queries.
    Index values are range-checked only for CPU tensors (a device tensor would force a sync).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _check_matrix("query", query)
    _check_matrix("key", key)
    n, c = query.shape
    if key.shape[1] != c:
        raise ValueError(
            f"query and key must share the feature dim C: query {tuple(query.shape)}, key {tuple(key.shape)}"
        )
    if negatives is not None:
        _check_matrix("negatives", negatives)
        if negatives.shape[1] != c:
            raise ValueError(
                f"query and negatives must share the feature dim C: query {tuple(query.shape)}, "
                f"negatives {tuple(negatives.shape)}"
            )
        if key.shape[0] != n:
            raise ValueError(
                f"with an explicit negative bank, key holds one positive per query: expected key "
                f"[N={n}, C], got query {tuple(query.shape)}, key {tuple(key.shape)}"
            )
        if positive_index is not None or exclude_index is not None:
            raise ValueError(
                "positive_index / exclude_index apply only to in-batch negatives (negatives=None); "
                "with an explicit bank the positive is key[i] and nothing is excluded"
            )
    else:
        m = key.shape[0]
        if positive_index is None and m < n:
            raise ValueError(
                f"key must have at least N rows when positive_index is not given (query i's positive "
                f"is key[i]): query {tuple(query.shape)}, key {tuple(key.shape)}"
            )
        if positive_index is not None:
            _check_index("positive_index", positive_index, n, m)
        if exclude_index is not None:
            _check_index("exclude_index", exclude_index, n, m)

    # Similarities in >= float32 regardless of autocast (half-precision exp(s / tau) overflows).
    dtype = torch.promote_types(query.dtype, torch.float32)
    with torch.autocast(device_type=query.device.type, enabled=False):
        q, k = query.to(dtype), key.to(dtype)
        neg = negatives.to(dtype) if negatives is not None else None
        if normalize:  # cosine similarity: sim(u, v) = u.v / (|u| |v|)
            q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
            neg = F.normalize(neg, dim=1) if neg is not None else None

        if neg is not None:
            # MoCo Eq. 1: the positive sits in column 0.
            l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(1)  # q: [N, C], k: [N, C] -> l_pos: [N, 1]
            l_neg = torch.einsum("nc,kc->nk", q, neg)  # q: [N, C], queue: [K, C] -> l_neg: [N, K]
            logits = torch.cat([l_pos, l_neg], dim=1) / temperature  # -> logits: [N, 1 + K]
            target = torch.zeros(n, dtype=torch.long, device=query.device)  # [N]
        else:
            logits = torch.einsum("nc,mc->nm", q, k) / temperature  # q: [N, C], k: [M, C] -> logits: [N, M]
            if positive_index is None:
                target = torch.arange(n, device=query.device)  # [N]
            else:
                target = positive_index.to(query.device)  # [N]
            if exclude_index is not None:
                # Drop one candidate per row from the softmax: exp(-inf) = 0 in the denominator.
                excluded = exclude_index.to(query.device).unsqueeze(1)  # [N] -> [N, 1]
                logits = logits.scatter(1, excluded, float("-inf"))  # [N, M]
        return F.cross_entropy(logits, target)


def nt_xent(
    z1: Tensor,
    z2: Tensor,
    temperature: float = 0.5,
    *,
    z1_all: Tensor | None = None,
    z2_all: Tensor | None = None,
    offset: int = 0,
) -> Tensor:
    """SimCLR's NT-Xent (Chen et al. 2020, Eq. 1) over the 2N local anchors, averaged.

    Each anchor's positive is its other view; every other view among the 2M candidates
    `cat(z1_all, z2_all)` is a negative, its own copy excluded. Candidates default to the local
    views (M = N). In a multi-process run pass the gathered views `[M = W*N, C]` and
    `offset = rank * N`, the position of this process's samples inside them.
    """
    _check_matrix("z1", z1)
    _check_matrix("z2", z2)
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape [N, C]: z1 {tuple(z1.shape)}, z2 {tuple(z2.shape)}")
    if (z1_all is None) != (z2_all is None):
        raise ValueError("pass both z1_all and z2_all (the gathered views) or neither")
    if z1_all is None:
        z1_all, z2_all = z1, z2
        if offset != 0:
            raise ValueError(f"offset={offset} needs z1_all/z2_all; without them the candidates are the local views")
    assert z2_all is not None  # for type checkers
    _check_matrix("z1_all", z1_all)
    _check_matrix("z2_all", z2_all)
    if z1_all.shape != z2_all.shape:
        raise ValueError(
            f"z1_all and z2_all must have the same shape [M, C]: z1_all {tuple(z1_all.shape)}, "
            f"z2_all {tuple(z2_all.shape)}"
        )
    n, c = z1.shape
    m = z1_all.shape[0]
    if z1_all.shape[1] != c:
        raise ValueError(
            f"local and gathered views must share the feature dim C: z1 {tuple(z1.shape)}, z1_all {tuple(z1_all.shape)}"
        )
    if offset < 0 or offset + n > m:
        raise ValueError(
            f"offset={offset} puts the N={n} local samples outside the M={m} gathered ones "
            f"(need 0 <= offset and offset + N <= M): z1 {tuple(z1.shape)}, z1_all {tuple(z1_all.shape)}"
        )

    anchors = torch.cat([z1, z2], dim=0)  # z1, z2: [N, C] -> anchors: [2N, C]
    candidates = torch.cat([z1_all, z2_all], dim=0)  # z1_all, z2_all: [M, C] -> candidates: [2M, C]
    local = torch.arange(n, device=z1.device) + offset  # this process's rows in z*_all: [N]
    # Anchor z1[i] -> positive z2_all[offset + i] (candidate M + offset + i), excludes z1_all[offset + i];
    # anchor z2[i] -> positive z1_all[offset + i], excludes z2_all[offset + i] (candidate M + offset + i).
    positive_index = torch.cat([local + m, local])  # [2N]
    exclude_index = torch.cat([local, local + m])  # [2N]
    return info_nce(
        anchors,
        candidates,
        temperature=temperature,
        positive_index=positive_index,
        exclude_index=exclude_index,
        normalize=True,
    )


def self_distillation(student_logits: Tensor, teacher_probs: Tensor, student_temperature: float = 0.1) -> Tensor:
    """DINO's loss (Caron et al. 2021, Eq. 3 / Alg. 1): cross-entropy H(P_t, P_s) averaged over every pair of a
    teacher view g and a student view v != g; the teacher's G views are the student's first G.

    student_logits: [V, N, K] (raw head outputs, all crops); teacher_probs: [G, N, K] (the teacher's centred,
    sharpened softmax, no gradient). Also iBOT's [CLS] term. Computed in float32 at least.
    """
    if student_logits.dim() != 3 or teacher_probs.dim() != 3 or student_logits.shape[1:] != teacher_probs.shape[1:]:
        raise ValueError(f"student_logits [V, N, K] and teacher_probs [G, N, K] must agree in N and K, got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_probs.shape)}")
    views, n, _ = student_logits.shape
    teachers = teacher_probs.shape[0]
    if teachers > views or (views == 1 and teachers == 1):
        raise ValueError(f"need more student views ({views}) than the teacher's {teachers} and at least one pair")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_p = F.log_softmax(student_logits.to(dtype) / student_temperature, dim=-1)  # [V, N, K]
    cross = -torch.einsum("gnk,vnk->gv", teacher_probs.to(dtype), log_p) / n  # [G, V]: mean CE over the N images
    other_view = ~torch.eye(teachers, views, dtype=torch.bool, device=cross.device)  # [G, V]: v != g
    return cross[other_view].mean()


def masked_self_distillation(student_logits: Tensor, teacher_probs: Tensor, mask: Tensor,
                             student_temperature: float = 0.1) -> Tensor:
    """iBOT's masked image modelling loss (Zhou et al. 2022, Eq. 2): per image, the cross-entropy between the
    teacher's and the student's patch-token distributions of the same crop, averaged over its masked tokens; then
    the mean over images (an image without masked tokens counts 0) and over the G global crops.

    student_logits: [G, N, L, K] (the masked crops' patch tokens); teacher_probs: [G, N, L, K] (unmasked crops,
    centred and sharpened); mask: [G, N, L] bool, True = masked.
    """
    if student_logits.shape != teacher_probs.shape or mask.shape != student_logits.shape[:-1]:
        raise ValueError(f"student_logits and teacher_probs [G, N, L, K] and mask [G, N, L] must agree, got "
                         f"{tuple(student_logits.shape)}, {tuple(teacher_probs.shape)}, {tuple(mask.shape)}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_p = F.log_softmax(student_logits.to(dtype) / student_temperature, dim=-1)  # [G, N, L, K]
    cross = -(teacher_probs.to(dtype) * log_p).sum(dim=-1)  # [G, N, L]
    weights = mask.to(dtype)
    per_image = (cross * weights).sum(dim=-1) / weights.sum(dim=-1).clamp(min=1.0)  # [G, N]
    return per_image.mean()


def flood(loss: Tensor, level: float | None) -> Tensor:
    """Flooding (Ishida et al. 2020, Eq. 2): |loss - b| + b. Equal to the loss above the flood level b; below
    it the gradient is that of -loss (gradient ascent), so the training loss hovers at b instead of reaching 0.
    `level` None: the loss unchanged. Applied to each (micro-)batch's mean loss, as in the paper.
    """
    if level is None:
        return loss
    return (loss - level).abs() + level


def _check_pair(z1: Tensor, z2: Tensor) -> None:
    _check_matrix("z1", z1)
    _check_matrix("z2", z2)
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape [N, D]: z1 {tuple(z1.shape)}, z2 {tuple(z2.shape)}")


def _wide(x: Tensor) -> Tensor:
    """x in >= float32: batch statistics and D x D products lose too much in half precision."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """BYOL's normalised MSE (Grill et al. 2020, Eq. 2): ||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z), mean over N.

    `p: [N, D]` the online prediction, `z: [N, D]` the target projection of the other view (the caller
    detaches it). Per sample, so no gather: a process's mean over its own rows averages to the global mean.
    """
    _check_pair(p, z)
    with torch.autocast(device_type=p.device.type, enabled=False):
        p, z = F.normalize(_wide(p), dim=1), F.normalize(_wide(z), dim=1)  # [N, D] each, unit rows
        return (2 - 2 * (p * z).sum(dim=1)).mean()  # [N] -> []


def cross_correlation(z1: Tensor, z2: Tensor, eps: float = 1e-5) -> Tensor:
    """Barlow Twins' C (Eq. 2): each dimension standardised over the batch, then C_ij = mean_b z1_bi z2_bj.

    `z1, z2: [N, D] -> C: [D, D]`. Standardising uses the biased batch variance plus `eps`, as the official
    code's affine-free BatchNorm1d does (facebookresearch/barlowtwins main.py L205, L212-216), so C_ii is the
    Pearson correlation of dimension i across the two views (up to eps).
    """
    _check_pair(z1, z2)
    n = z1.shape[0]
    with torch.autocast(device_type=z1.device.type, enabled=False):
        z1, z2 = _wide(z1), _wide(z2)
        z1 = (z1 - z1.mean(0)) / torch.sqrt(z1.var(0, unbiased=False) + eps)  # [N, D], per-dimension standardised
        z2 = (z2 - z2.mean(0)) / torch.sqrt(z2.var(0, unbiased=False) + eps)  # [N, D]
        return torch.einsum("bi,bj->ij", z1, z2) / n  # z1: [N, D], z2: [N, D] -> C: [D, D]


def _off_diagonal(c: Tensor) -> Tensor:
    """The D*(D-1) off-diagonal entries of a square matrix, flattened: [D, D] -> [D*(D-1)]."""
    d = c.shape[0]
    return c.flatten()[:-1].view(d - 1, d + 1)[:, 1:].flatten()  # drops each diagonal entry


def barlow_twins_loss(z1: Tensor, z2: Tensor, off_diagonal_weight: float = 5e-3, eps: float = 1e-5) -> Tensor:
    """Barlow Twins (Eq. 1): sum_i (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2 over the batch given.

    `z1, z2: [N, D]`, the projector outputs of the two views for the whole (global) batch; N >= 2.
    """
    if z1.dim() == 2 and z1.shape[0] < 2:
        raise ValueError(f"the cross-correlation needs a batch of at least 2 rows, got z1 {tuple(z1.shape)}")
    c = cross_correlation(z1, z2, eps)  # [D, D]
    on_diagonal = (torch.diagonal(c) - 1).pow(2).sum()  # invariance: C_ii -> 1
    off_diagonal = _off_diagonal(c).pow(2).sum()  # redundancy reduction: C_ij -> 0
    return on_diagonal + off_diagonal_weight * off_diagonal


def vicreg_terms(z1: Tensor, z2: Tensor, gamma: float = 1.0, eps: float = 1e-4) -> tuple[Tensor, Tensor, Tensor]:
    """VICReg's three terms (Bardes et al. 2022, Eqs. 1-5) over the batch given: (invariance, variance, covariance).

    `z1, z2: [N, D]` (N >= 2). Invariance s: mean squared distance per entry (Eq. 5, as F.mse_loss). Variance v:
    mean over dimensions of max(0, gamma - sqrt(Var(z_j) + eps)), unbiased variance, averaged over the two
    branches (Eq. 1). Covariance c: sum of squared off-diagonal entries of the unbiased covariance matrix
    divided by D (Eqs. 3-4), summed over the two branches, as facebookresearch/vicreg main_vicreg.py L198-213.
    """
    _check_pair(z1, z2)
    n, d = z1.shape
    if n < 2:
        raise ValueError(f"VICReg's variance and covariance need a batch of at least 2 rows, got z1 {tuple(z1.shape)}")
    with torch.autocast(device_type=z1.device.type, enabled=False):
        z1, z2 = _wide(z1), _wide(z2)
        invariance = F.mse_loss(z1, z2)  # mean over N*D entries
        variance, covariance = z1.new_zeros(()), z1.new_zeros(())
        for z in (z1, z2):
            z = z - z.mean(0)  # [N, D], centred per dimension
            std = torch.sqrt(z.var(0) + eps)  # [D], unbiased
            variance = variance + F.relu(gamma - std).mean() / 2
            cov = torch.einsum("ni,nj->ij", z, z) / (n - 1)  # z: [N, D] -> cov: [D, D]
            covariance = covariance + _off_diagonal(cov).pow(2).sum() / d
        return invariance, variance, covariance


def vicreg_loss(
    z1: Tensor, z2: Tensor, invariance_weight: float = 25.0, variance_weight: float = 25.0,
    covariance_weight: float = 1.0,
) -> Tensor:
    """VICReg (Eq. 6): lambda s + mu v + nu c, with the paper's 25 / 25 / 1 by default. `z1, z2: [N, D]`."""
    invariance, variance, covariance = vicreg_terms(z1, z2)
    return invariance_weight * invariance + variance_weight * variance + covariance_weight * covariance
