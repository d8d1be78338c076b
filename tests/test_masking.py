"""Masking math against naive loops and exact counts: patchify, MAE random masking, SimMIM block masks, losses."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from selfsup.builders import build_pretraining
from selfsup.config import from_dict
from selfsup.masking import (
    SimMIMMaskGenerator,
    WithMask,
    masked_l1,
    masked_mse,
    patchify,
    random_masking,
    sincos_pos_embed,
    unpatchify,
    valid_mask_patch_sizes,
)
from selfsup.sampling import ViewDataset
from tests.conftest import tiny_config_dict


@pytest.mark.parametrize("patch, channels, grid", [(4, 3, (4, 4)), (2, 1, (3, 5)), (7, 5, (2, 1)), (1, 2, (3, 3))])
def test_patchify_matches_a_naive_crop_loop_and_unpatchify_inverts_it(patch, channels, grid):
    images = torch.randn(2, channels, grid[0] * patch, grid[1] * patch)
    patches = patchify(images, patch)
    assert patches.shape == (2, grid[0] * grid[1], patch * patch * channels)
    for n in range(2):
        for i in range(grid[0]):
            for j in range(grid[1]):
                crop = images[n, :, i * patch : (i + 1) * patch, j * patch : (j + 1) * patch]  # [C, p, p]
                assert torch.equal(patches[n, i * grid[1] + j], crop.permute(1, 2, 0).flatten())  # (p q c) order
    assert torch.equal(unpatchify(patches, patch, grid, channels), images)
    if grid[0] == grid[1]:
        assert torch.equal(unpatchify(patches, patch), images)  # square grid and channels inferred
    assert torch.equal(patchify(unpatchify(patches, patch, grid, channels), patch), patches)


def test_patch_shape_errors_are_clear():
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        patchify(torch.zeros(1, 3, 10, 12), 4)
    with pytest.raises(ValueError, match="square grid"):
        unpatchify(torch.zeros(1, 6, 48), 4)


@pytest.mark.parametrize("length, ratio", [(49, 0.75), (64, 0.75), (16, 0.5), (10, 0.33), (196, 0.9), (5, 0.0)])
def test_random_masking_keeps_exactly_round_l_times_one_minus_ratio_per_sample(length, ratio):
    n, dim = 6, 3
    x = torch.randn(n, length, dim)
    visible, mask, ids_restore = random_masking(x, ratio)
    keep = round(length * (1 - ratio))
    assert visible.shape == (n, keep, dim)
    assert mask.shape == (n, length) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert mask.sum(dim=1).tolist() == [length - keep] * n
    for i in range(n):
        assert sorted(ids_restore[i].tolist()) == list(range(length))  # a permutation
        # the visible tokens are exactly the tokens where mask == 0 (as multisets of rows)
        kept_rows = x[i][mask[i] == 0]
        assert torch.equal(visible[i][visible[i][:, 0].argsort()], kept_rows[kept_rows[:, 0].argsort()])


def test_restore_indices_put_visible_tokens_and_placeholders_back_in_the_original_order():
    x = torch.arange(2 * 12, dtype=torch.float32).view(2, 12, 1).expand(-1, -1, 4).clone()
    visible, mask, ids_restore = random_masking(x, 0.75)
    placeholder = torch.full((2, 12 - visible.shape[1], 4), -1.0)
    shuffled = torch.cat([visible, placeholder], dim=1)
    restored = shuffled.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, 4))
    for i in range(2):
        for pos in range(12):
            expected = x[i, pos] if mask[i, pos] == 0 else placeholder[i, 0]
            assert torch.equal(restored[i, pos], expected)


def test_random_masking_is_fixed_by_a_generator_and_differs_per_sample():
    x = torch.randn(8, 64, 2)
    a = random_masking(x, 0.75, torch.Generator().manual_seed(3))[1]
    b = random_masking(x, 0.75, torch.Generator().manual_seed(3))[1]
    assert torch.equal(a, b)
    assert len({tuple(row.tolist()) for row in a}) == 8
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(x, 1.0)


@pytest.mark.parametrize(
    "image, mask_patch, patch, ratio", [(192, 32, 16, 0.6), (28, 4, 4, 0.6), (32, 8, 4, 0.5), ((16, 24), 8, 2, 0.3)]
)
def test_simmim_mask_has_exact_ratio_and_block_size(image, mask_patch, patch, ratio):
    gen = SimMIMMaskGenerator(image, mask_patch, patch, ratio)
    h, w = (image, image) if isinstance(image, int) else image
    s = mask_patch // patch
    blocks = (h // mask_patch) * (w // mask_patch)
    torch.manual_seed(0)
    masks = [gen() for _ in range(20)]
    for mask in masks:
        assert mask.shape == (h // patch, w // patch) and mask.dtype == torch.bool
        # every s x s cell of model patches is one block: all masked or all visible
        cells = mask.view(h // mask_patch, s, w // mask_patch, s)
        assert torch.equal(cells.all(dim=3).all(dim=1), cells.any(dim=3).any(dim=1))
        assert int(cells.any(dim=3).any(dim=1).sum()) == math.ceil(blocks * ratio)
        assert int(mask.sum()) == math.ceil(blocks * ratio) * s * s
    if blocks > 2:
        assert len({tuple(m.flatten().tolist()) for m in masks}) > 1


def test_simmim_mask_size_errors_name_the_valid_values():
    with pytest.raises(ValueError, match=r"valid values here: 4, 28"):
        SimMIMMaskGenerator(28, 8, 4, 0.6)
    with pytest.raises(ValueError, match="multiple of the model's patch size"):
        SimMIMMaskGenerator(32, 6, 4, 0.6)
    with pytest.raises(ValueError, match="mask_ratio"):
        SimMIMMaskGenerator(32, 8, 4, 1.0)
    assert valid_mask_patch_sizes((192, 192), 16) == [16, 32, 48, 64, 96, 192]


def test_with_mask_is_deterministic_per_sample_through_view_dataset():
    base = [(torch.rand(3, 16, 16), 0) for _ in range(4)]
    gen = SimMIMMaskGenerator(16, 4, 2, 0.5)
    data = ViewDataset(base, WithMask(lambda im: [im * 2], gen), seed=1)
    (view, mask), _ = data[(0, 2)]
    assert torch.equal(view, base[2][0] * 2) and mask.shape == (8, 8)
    assert torch.equal(data[(0, 2)][0][1], mask)  # same (seed, epoch, index): same mask
    others = [data[(e, i)][0][1] for e, i in [(1, 2), (0, 0), (0, 1), (0, 3)]]
    assert any(not torch.equal(mask, m) for m in others)


def test_simmim_batches_carry_images_and_masks(tmp_path):
    method = {"name": "simmim", "mask_patch_size": 8, "mask_ratio": 0.6}
    backbone = {"name": "vit_tiny_patch4", "kwargs": {"img_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2}}
    cfg = from_dict(tiny_config_dict(tmp_path, method=method, backbone=backbone))
    _, train_set, _ = build_pretraining(cfg)
    (image, mask), label = train_set[(0, 5)]
    assert image.shape == (3, 16, 16) and mask.shape == (4, 4)
    assert int(mask.sum()) == math.ceil(4 * 0.6) * 4


def test_masked_losses_match_naive_loops():
    torch.manual_seed(0)
    pred, target = torch.randn(3, 10, 12), torch.randn(3, 10, 12)
    mask = (torch.rand(3, 10) < 0.5).float()
    terms = [((pred[n, l] - target[n, l]) ** 2).mean() for n in range(3) for l in range(10) if mask[n, l]]
    assert_close(masked_mse(pred, target, mask), torch.stack(terms).mean())

    pred, target = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    pixel_mask = torch.rand(2, 4, 4) < 0.4
    total, count = 0.0, 0
    for n in range(2):
        for i in range(4):
            for j in range(4):
                if pixel_mask[n, i, j]:
                    total += (pred[n, :, i, j] - target[n, :, i, j]).abs().sum()
                    count += 1
    assert_close(masked_l1(pred, target, pixel_mask), total / (count * 3))


def test_sincos_pos_embed_rows_are_distinct_and_prefix_rows_zero():
    table = sincos_pos_embed((3, 4), 16, num_prefix_tokens=1)
    assert table.shape == (1, 13, 16)
    assert torch.equal(table[0, 0], torch.zeros(16))
    assert torch.cdist(table[0, 1:], table[0, 1:]).add(torch.eye(12)).min() > 0.1
    assert_close(table[0, 1, :], torch.tensor([0.0] * 8 + [1.0] * 8))  # position (0, 0): sin 0, cos 0
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed((2, 2), 10)
