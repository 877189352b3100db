"""Tile geometry, weight maps and fusion (MultiDiffusion eq. 5, Mixture of Diffusers weights)."""

import pytest
import torch

from core.tiling.rect import Rect
from core.tiling.tiles import Tile, fuse_views, fuse_with_coverage, grid_tiles, weight_map


def boxes(tiles):
    return [(t.rect.y0, t.rect.x0, t.rect.h, t.rect.w, t.index) for t in tiles]


# Golden tile lists derived by hand from n = ceil((L - tile) / stride) + 1 and the shift-back rule.
@pytest.mark.parametrize(
    ("height", "width", "tile", "overlap", "expected"),
    [
        # 2x2 grid, no overlap.
        (8, 8, 4, 0, [(0, 0, 4, 4, 0), (0, 4, 4, 4, 1), (4, 0, 4, 4, 2), (4, 4, 4, 4, 3)]),
        # stride 4: rows ceil(4/4)+1 = 2 -> [0, 4]; cols ceil(8/4)+1 = 3 -> [0, 4, 8].
        (
            10,
            14,
            6,
            2,
            [(y, x, 6, 6, i * 3 + j) for i, y in enumerate((0, 4)) for j, x in enumerate((0, 4, 8))],
        ),
        # stride 6: rows [0, min(6, 12-8)=4]; cols [0, min(6, 10-8)=2] (last window shifted back).
        (12, 10, 8, 2, [(0, 0, 8, 8, 0), (0, 2, 8, 8, 1), (4, 0, 8, 8, 2), (4, 2, 8, 8, 3)]),
        # tile > latent height: clamped to 6, one row; cols stride 6 -> [0, 6, 12].
        (6, 20, 8, 2, [(0, 0, 6, 8, 0), (0, 6, 6, 8, 1), (0, 12, 6, 8, 2)]),
        # non-square tile (4, 8), overlap 2: rows stride 2 -> [0, 2, 4]; cols stride 6 -> [0, 6, 8].
        (
            8,
            16,
            (4, 8),
            2,
            [(y, x, 4, 8, i * 3 + j) for i, y in enumerate((0, 2, 4)) for j, x in enumerate((0, 6, 8))],
        ),
        # tile larger than the whole latent: one tile covering it.
        (6, 4, 16, 4, [(0, 0, 6, 4, 0)]),
    ],
)
def test_grid_tiles_golden(height, width, tile, overlap, expected):
    assert boxes(grid_tiles(height, width, tile=tile, overlap=overlap)) == expected


def test_grid_tiles_cover_and_align():
    tiles = grid_tiles(46, 70, tile=(16, 24), overlap=6)
    count = torch.zeros(46, 70)
    for t in tiles:
        assert t.rect.y0 % 2 == t.rect.x0 % 2 == t.rect.h % 2 == t.rect.w % 2 == 0
        count[t.rect.slices()] += 1
    assert bool((count >= 1).all())


def test_grid_tiles_rejects_bad_values():
    with pytest.raises(ValueError, match="overlap"):
        grid_tiles(32, 32, tile=8, overlap=6)
    with pytest.raises(ValueError, match="height must be a multiple of align=2, got 9"):
        grid_tiles(9, 32, tile=8, overlap=2)
    with pytest.raises(ValueError, match="overlap must be >= 0"):
        grid_tiles(32, 32, tile=8, overlap=-2)


def test_mixture_weights_golden():
    # Hand-derived: g_n(x) = exp(-(x - (n-1)/2)^2 / (2 * 0.02 * n^2)) / sqrt(2 pi 0.02).
    # n=4, x=0: exp(-2.25/0.64) / 0.3544908 = 0.0838646; x=1: exp(-0.25/0.64) / 0.3544908 = 1.9087488.
    # n=6, x=0: exp(-6.25/1.44) / 0.3544908 = 0.0367652; x=2: exp(-0.25/1.44) / 0.3544908 = 2.3713558.
    w = weight_map(4, 6, "mixture")
    assert w.shape == (4, 6) and w.dtype == torch.float32
    assert w[0, 0].item() == pytest.approx(0.0838646 * 0.0367652, rel=1e-5)
    assert w[1, 2].item() == pytest.approx(1.9087488 * 2.3713558, rel=1e-6)
    # Symmetric midpoints: the map is mirror-symmetric on both axes (the original used h/2 on y).
    assert torch.equal(w, w.flip(0)) and torch.equal(w, w.flip(1))
    assert torch.equal(weight_map(3, 5, "multidiffusion"), torch.ones(3, 5))
    with pytest.raises(ValueError, match="method"):
        weight_map(4, 4, "gaussian")


def test_coverage_assertion_var():
    # One 128x128 Gaussian tile: var 0.02 keeps the corner weight above 1e-6 (about 3.6e-5),
    # var 0.01 drops it to about 3e-10, which the coverage check must reject.
    tile = [Tile(Rect(0, 0, 128, 128), 0)]
    out = [torch.ones(1, 128, 128)]
    fuse_views((1, 1, 128, 128), tile, out, [weight_map(128, 128, "mixture", var=0.02)])
    with pytest.raises(ValueError, match="tile weight <= 1e-06"):
        fuse_views((1, 1, 128, 128), tile, out, [weight_map(128, 128, "mixture", var=0.01)])


def test_fuse_uncovered_pixels():
    tiles = [Tile(Rect(0, 0, 4, 4), 0)]
    out = [torch.full((2, 4, 4), 3.0)]
    with pytest.raises(ValueError, match="32 of 48 latent pixels"):
        fuse_views((1, 2, 4, 12), tiles, out, [torch.ones(4, 4)])
    fused = fuse_views((1, 2, 4, 12), tiles, out, [torch.ones(4, 4)], require_coverage=False)
    assert torch.equal(fused[..., :4], torch.full((1, 2, 4, 4), 3.0))
    assert torch.equal(fused[..., 4:], torch.zeros(1, 2, 4, 8))
    _, wsum = fuse_with_coverage((1, 2, 4, 12), tiles, out, [torch.ones(4, 4)])
    assert torch.equal(wsum, torch.cat([torch.ones(4, 4), torch.zeros(4, 8)], dim=1))


def test_fuse_single_tile_is_identity():
    v = torch.randn(3, 6, 10, generator=torch.Generator().manual_seed(0))
    tile = [Tile(Rect(0, 0, 6, 10), 0)]
    assert torch.equal(fuse_views((1, 3, 6, 10), tile, [v], [torch.ones(6, 10)]), v[None])
    mixed = fuse_views((1, 3, 6, 10), tile, [v], [weight_map(6, 10, "mixture")])
    torch.testing.assert_close(mixed, v[None], rtol=1e-6, atol=1e-6)


def test_fuse_weighted_average_by_hand():
    # Two tiles overlapping in column 2 of a 1x4 latent: there the value is (w_a a + w_b b) / (w_a + w_b).
    a, b = torch.full((1, 1, 3), 1.0), torch.full((1, 1, 2), 5.0)
    wa, wb = torch.tensor([[1.0, 1.0, 3.0]]), torch.tensor([[1.0, 2.0]])
    tiles = [Tile(Rect(0, 0, 1, 3), 0), Tile(Rect(0, 2, 1, 2), 1)]
    fused = fuse_views((1, 1, 1, 4), tiles, [a, b], [wa, wb])
    assert fused.flatten().tolist() == [1.0, 1.0, (3 * 1 + 1 * 5) / 4, 5.0]


def test_fuse_order_is_tile_index_not_arrival():
    gen = torch.Generator().manual_seed(1)
    tiles = grid_tiles(12, 12, tile=6, overlap=2)
    outs = [torch.randn(2, t.rect.h, t.rect.w, generator=gen) * 1e3 for t in tiles]
    weights = [weight_map(t.rect.h, t.rect.w, "mixture") for t in tiles]
    ref = fuse_views((1, 2, 12, 12), tiles, outs, weights)
    perm = [3, 0, 2, 1] + list(range(4, len(tiles)))
    shuffled = fuse_views(
        (1, 2, 12, 12), [tiles[i] for i in perm], [outs[i] for i in perm], [weights[i] for i in perm]
    )
    assert torch.equal(ref, shuffled)


def test_fuse_keeps_output_dtype():
    v = torch.randn(2, 4, 4).to(torch.bfloat16)
    fused = fuse_views((1, 2, 4, 4), [Tile(Rect(0, 0, 4, 4), 0)], [v], [torch.ones(4, 4)])
    assert fused.dtype == torch.bfloat16


def test_rect_cut_grow_and_scale():
    x = torch.arange(32.0).view(1, 1, 4, 8)
    assert torch.equal(Rect(1, 2, 2, 3).cut(x), x[..., 1:3, 2:5])
    assert Rect(1, 2, 2, 3).grow(2, 4, 6) == Rect(0, 0, 4, 6)  # clipped to the 4 x 6 grid
    assert Rect(8, 16, 8, 24).scale(1, 8) == Rect(1, 2, 1, 3) and Rect(1, 2, 3, 4).as_list() == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="whole pixels"):
        Rect(4, 0, 8, 8).scale(1, 8)


def test_tile_validation():
    with pytest.raises(ValueError, match="rect size"):
        Tile(Rect(0, 0, 0, 4), 0)
    with pytest.raises(ValueError, match="outside"):
        fuse_views((1, 1, 4, 4), [Tile(Rect(2, 0, 4, 4), 0)], [torch.ones(1, 4, 4)], [torch.ones(4, 4)])
    assert Rect(1, 2, 3, 4).y1 == 4 and Rect(1, 2, 3, 4).x1 == 6
