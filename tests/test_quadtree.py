"""Quadtree builder, leaf denoise, serialisation, latent tiles and overlay (comfyui-quadtree-tile rules)."""

import json
import math

import pytest
import torch

from core.tiling.quadtree import (
    Leaf,
    assign_denoise,
    build_quadtree,
    leaves_to_json,
    quadtree_overlay,
    quadtree_tiles,
)
from core.tiling.rect import Rect

# A 0/1 checkerboard has per-channel population variance 0.25 on [0, 1], so its RGB variation is
# sqrt(3 * 0.25 * 255^2) = 255 * sqrt(0.75) = 220.836...; a flat region has 0.
CHECKER_VARIATION = 255 * math.sqrt(0.75)


def checker(h, w, cell=1):
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return ((yy // cell + xx // cell) % 2).float().expand(3, h, w).clone()


def quadrant_image():
    """32x32: TL 0.2, TR 0.5, BL 0.8 flat; BR a 4-px checkerboard (busy, so its 8x8 children stay busy)."""
    img = torch.empty(3, 32, 32)
    img[:, :16, :16], img[:, :16, 16:], img[:, 16:, :16] = 0.2, 0.5, 0.8
    img[:, 16:, 16:] = checker(16, 16, cell=4)
    return img


def key(leaves):
    return [(leaf.rect.x0, leaf.rect.y0, leaf.rect.w, leaf.rect.h, leaf.depth) for leaf in leaves]


def test_quadrant_image_leaves():
    leaves = build_quadtree(quadrant_image(), min_tile=4)
    # Root splits; the flat quadrants are leaves; BR splits once into 8x8 children that cannot
    # split again (hw = 0 < min 4), depth-first in TL, TR, BL, BR order.
    assert key(leaves) == [
        (0, 0, 16, 16, 1),
        (16, 0, 16, 16, 1),
        (0, 16, 16, 16, 1),
        (16, 16, 8, 8, 2),
        (24, 16, 8, 8, 2),
        (16, 24, 8, 8, 2),
        (24, 24, 8, 8, 2),
    ]
    assert [leaf.score for leaf in leaves[:3]] == [0.0, 0.0, 0.0]
    for leaf in leaves[3:]:
        assert leaf.score == pytest.approx(CHECKER_VARIATION, rel=1e-6)
    assert all(leaf.denoise == 1.0 for leaf in leaves)  # unassigned until assign_denoise


def test_root_is_floored_to_multiple_of_8():
    img = torch.full((3, 35, 33), 0.5)
    assert key(build_quadtree(img)) == [(0, 0, 32, 32, 0)]


def test_flat_image_and_threshold():
    assert len(build_quadtree(torch.zeros(3, 64, 64))) == 1
    # The busy quadrant's variation is ~220.8: a threshold above it stops every split.
    assert len(build_quadtree(quadrant_image(), threshold=300.0)) == 1


def test_24_splits_into_8_and_16():
    leaves = build_quadtree(checker(24, 24), min_tile=4)
    # hw = floor(24/2/8)*8 = 8, so children are 8 and 16 wide; the 16x8 / 8x16 ones cannot split
    # further (their 8 side halves to 0) and the 16x16 one splits into four 8x8.
    assert key(leaves) == [
        (0, 0, 8, 8, 1),
        (8, 0, 16, 8, 1),
        (0, 8, 8, 16, 1),
        (8, 8, 8, 8, 2),
        (16, 8, 8, 8, 2),
        (8, 16, 8, 8, 2),
        (16, 16, 8, 8, 2),
    ]


def test_rectangular_root():
    leaves = build_quadtree(checker(16, 32), min_tile=4)
    assert key(leaves) == [(0, 0, 16, 8, 1), (16, 0, 16, 8, 1), (0, 8, 16, 8, 1), (16, 8, 16, 8, 1)]


def test_min_tile_and_max_depth():
    img = checker(64, 64)
    assert {leaf.rect.w for leaf in build_quadtree(img, min_tile=4)} == {8}
    assert {leaf.rect.w for leaf in build_quadtree(img, min_tile=16)} == {16}
    assert key(build_quadtree(img, min_tile=4, max_depth=1)) == [
        (0, 0, 32, 32, 1),
        (32, 0, 32, 32, 1),
        (0, 32, 32, 32, 1),
        (32, 32, 32, 32, 1),
    ]


def test_assign_denoise_formula():
    leaves = assign_denoise(build_quadtree(quadrant_image(), min_tile=4), 0.2, 0.8)
    # area_max = 256: 16x16 leaves get 0.2 + 0.6 * 0 = 0.2; 8x8 leaves 0.2 + 0.6 * (1 - 64/256) = 0.65.
    assert [leaf.denoise for leaf in leaves] == pytest.approx([0.2] * 3 + [0.65] * 4)
    assert assign_denoise([]) == []
    with pytest.raises(ValueError, match="d_min=0.9"):
        assign_denoise(leaves, 0.9, 0.1)


def test_json_records():
    leaves = assign_denoise(build_quadtree(quadrant_image(), min_tile=4))
    records = json.loads(json.dumps(leaves_to_json(leaves)))
    # Upstream's keys; "variance" holds the split score whatever the criterion.
    assert records[3] == {
        "x": 16,
        "y": 16,
        "w": 8,
        "h": 8,
        "depth": 2,
        "variance": leaves[3].score,
        "denoise": leaves[3].denoise,
    }
    assert records[3]["denoise"] == pytest.approx(0.65)


def test_legacy_criterion():
    flat = torch.full((3, 512, 512), 0.5)
    # Replicate padding: a flat grey image scores exactly 0 (zero padding would score its border).
    assert [(leaf.rect.w, leaf.score) for leaf in build_quadtree(flat, criterion="legacy")] == [(512, 0.0)]
    busy = flat.clone()
    busy[:, :256, :256] = checker(256, 256)
    leaves = build_quadtree(busy, criterion="legacy")
    # Root scores above 0.03 and splits into 256-px halves; those cannot split (128 < min 256).
    assert key(leaves) == [
        (0, 0, 256, 256, 1),
        (256, 0, 256, 256, 1),
        (0, 256, 256, 256, 1),
        (256, 256, 256, 256, 1),
    ]
    assert leaves[0].score > 0.03 and leaves[1].score == 0.0
    assert len(build_quadtree(busy, criterion="legacy", max_depth=0)) == 1


def test_builder_rejects_bad_input():
    with pytest.raises(ValueError, match="criterion"):
        build_quadtree(torch.zeros(3, 16, 16), criterion="entropy")
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        build_quadtree(torch.zeros(1, 16, 16))


def test_quadtree_tiles_golden():
    leaves = assign_denoise(build_quadtree(quadrant_image(), min_tile=4))
    tiles = quadtree_tiles(leaves, 4, 4, overlap=3)
    # Global overlap clamps to min(4, 4) // 4 = 1. 16-px leaves: core 2x2, o = min(1, 1, 1) = 1,
    # grown and clipped to the 4x4 latent. 8-px leaves: core 1x1, o = min(1, 0, 0) = 0.
    assert [(*t.rect.as_list(), t.index) for t in tiles] == [
        (0, 0, 3, 3, 0),
        (0, 1, 3, 3, 1),
        (1, 0, 3, 3, 2),
        (2, 2, 1, 1, 3),
        (2, 3, 1, 1, 4),
        (3, 2, 1, 1, 5),
        (3, 3, 1, 1, 6),
    ]
    with pytest.raises(ValueError, match="outside"):
        quadtree_tiles(leaves, 2, 4, overlap=0)
    with pytest.raises(ValueError, match="whole pixels"):
        quadtree_tiles([Leaf(Rect(0, 0, 12, 16), 0, 0.0)], 4, 4, overlap=0)


def test_max_tile_splits_flat_regions():
    flat = torch.zeros(3, 64, 128)
    assert key(build_quadtree(flat)) == [(0, 0, 128, 64, 0)]
    # Sides above 32 split by size alone, past the 64 px minimum leaf: 128x64 -> 64x32 -> 32x16 (a
    # quadtree halves both axes), and past max_depth too.
    capped = build_quadtree(flat, max_tile=32)
    assert len(capped) == 16 and {(leaf.rect.w, leaf.rect.h) for leaf in capped} == {(32, 16)}
    assert key(build_quadtree(flat, max_tile=32, max_depth=1)) == key(capped)
    with pytest.raises(ValueError, match="max_tile"):
        build_quadtree(flat, max_tile=8)


def test_overlay():
    img = quadrant_image()
    leaves = assign_denoise(build_quadtree(img, min_tile=4))
    out = quadtree_overlay(img, leaves)
    assert out.shape == img.shape
    # Inside the TL leaf (denoise 0.2): 0.65 * 0.2 + 0.35 * (0.2, 0, 0.8).
    expected = torch.tensor([0.65 * 0.2 + 0.35 * 0.2, 0.65 * 0.2, 0.65 * 0.2 + 0.35 * 0.8])
    torch.testing.assert_close(out[:, 5, 5], expected)
    assert torch.equal(out[:, 0, 5], torch.ones(3)) and torch.equal(out[:, 15, 5], torch.ones(3))
    assert isinstance(leaves[0], Leaf)
