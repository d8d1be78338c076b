"""Contrastive objectives shared by the methods, as pure tensor functions.

`info_nce` is the one contrastive cross-entropy (van den Oord et al. 2018, Eq. 4; MoCo Eq. 1);
`nt_xent` is SimCLR's 2N-view form of it (Chen et al. 2020, Eq. 1). They never gather across
processes or own a queue: callers pass gathered keys (`selfsup.distributed.gather_with_grad`) or
a negative bank explicitly, so the math stays testable on one CPU. No library offers these with
explicit gathered-candidate indexing, so they are written by hand.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["flood", "info_nce", "nt_xent", "self_distillation", "masked_self_distillation"]


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
