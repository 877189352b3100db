"""Fused tiling plans: equivalences with untiled / pasted / img2img runs, per-tile denoise, Spot shifts."""

import pytest
import torch
import torch.nn.functional as F

from core.flow.schedules import euler_step, get_sigmas, img2img_sigmas, img2img_start, noise_to
from core.flow.seeds import gaussian_noise
from core.tiling.quadtree import assign_denoise, build_quadtree, quadtree_tiles
from core.tiling.rect import Rect
from core.tiling.tile_plans import SpotPlan, TilePlan, fibonacci_spacing, pin_to_reference
from core.tiling.tiles import Tile, grid_tiles, weight_map

C = 4
KERNEL = torch.randn(C, C, 3, 3, generator=torch.Generator().manual_seed(7)) * 0.2


def fake_velocity(x: torch.Tensor) -> torch.Tensor:
    """Not pointwise: a zero-padded 3x3 conv plus the view's mean, so tile borders change the output.

    The input is made contiguous first (as stacking a batch does), so a slice and a copy of the same
    window give bitwise equal outputs and the equivalences below can be exact.
    """
    x = x.contiguous()
    return F.conv2d(x[None], KERNEL, padding=1)[0] + x.mean()


def evaluate(views):
    return [fake_velocity(v.x) for v in views]


def latent(h, w, seed=0):
    return gaussian_noise((1, C, h, w), seed)


def step_velocity(plan, x, sigma=0.7, step=0):
    return plan.fuse(x, evaluate(plan.views(x, sigma, step)), sigma, step)


def sample(plan, x, sigmas, *, start=0, pin=None):
    """Tiny Euler loop over sigmas[start:]; pin(k) -> z_ref at sigma_{k+1} turns on per-tile pinning."""
    for k in range(start, len(sigmas) - 1):
        x = euler_step(x, step_velocity(plan, x, sigmas[k], k), sigmas[k], sigmas[k + 1])
        if pin is not None:
            x = pin_to_reference(x, plan.activity(k), pin(k))
    return x


def test_one_tile_equals_untiled():
    x = latent(12, 16)
    untiled = fake_velocity(x[0])[None]
    plan = TilePlan(grid_tiles(12, 16, tile=64, overlap=8))
    assert len(plan.tiles) == 1
    assert torch.equal(step_velocity(plan, x), untiled)
    mixed = step_velocity(TilePlan(plan.tiles, method="mixture"), x)
    torch.testing.assert_close(mixed, untiled, rtol=1e-5, atol=1e-6)


def test_overlap_zero_equals_pasting_independent_tiles():
    x = latent(8, 12)
    expected = torch.empty_like(x)
    for y in (0, 4):
        for xx in (0, 4, 8):
            expected[0, :, y : y + 4, xx : xx + 4] = fake_velocity(x[0, :, y : y + 4, xx : xx + 4])
    fused = step_velocity(TilePlan(grid_tiles(8, 12, tile=4, overlap=0)), x)
    assert torch.equal(fused, expected)
    # The fake model is not pointwise, so tiling really changes the result.
    assert not torch.allclose(fused, fake_velocity(x[0])[None], atol=1e-3)


def test_mixture_overlap_by_hand():
    x = latent(4, 6)
    tiles = [Tile(Rect(0, 0, 4, 4), 0), Tile(Rect(0, 2, 4, 4), 1)]
    fused = step_velocity(TilePlan(tiles, method="mixture"), x)
    va, vb = fake_velocity(x[0, :, :, :4]), fake_velocity(x[0, :, :, 2:])
    w = weight_map(4, 4, "mixture")
    overlap = (va[:, :, 2:] * w[:, 2:] + vb[:, :, :2] * w[:, :2]) / (w[:, 2:] + w[:, :2])
    torch.testing.assert_close(fused[0, :, :, 2:4], overlap)
    torch.testing.assert_close(fused[0, :, :, :2], va[:, :, :2])


def starts(denoise, steps):
    return [img2img_start(steps, d) for d in denoise]


def test_tile_starts_follow_the_img2img_rule():
    # s = N - ceil(N d): 0.25 * 10 = 2.5 -> 3 steps run -> s = 7 (the pass a plain img2img at 0.25 runs).
    assert starts([1.0, 0.5, 0.25, 0.0], 10) == [0, 5, 7, 10]
    # 0.7 * 10 = 7.000000000000001 in floats: 7 steps, not 8.
    assert img2img_start(10, 0.7) == 3
    with pytest.raises(ValueError, match="1.5"):
        img2img_start(10, 1.5)


def test_activity_golden():
    tiles = [Tile(Rect(0, 0, 2, 4), 0), Tile(Rect(0, 2, 2, 4), 1)]
    plan = TilePlan(tiles, start_index=[0, 3], width=8)
    # Step 1: tile 0 only; shared columns 2-3 are half active; column 6-7 is covered by nothing.
    assert plan.activity(1)[0].tolist() == [1.0, 1.0, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0]
    assert plan.activity(3)[0].tolist() == [1.0] * 6 + [0.0, 0.0]
    assert len(plan.views(latent(2, 8), 0.5, 1)) == 1
    # Before any tile starts there is nothing to run and the fused velocity is zero (pinning does the rest).
    idle = TilePlan(tiles, start_index=[2, 3], width=8)
    x = latent(2, 8).to(torch.bfloat16)
    assert idle.views(x, 0.5, 1) == []
    v = idle.fuse(x, [], 0.5, 1)
    assert v.dtype == torch.bfloat16 and torch.equal(v, torch.zeros_like(x))


def reference_setup(h, w, steps):
    sigmas = get_sigmas(steps, mu=0.8)
    x_ref, eps = latent(h, w, seed=1), latent(h, w, seed=2)  # one eps for the whole latent
    return sigmas, x_ref, eps, (lambda k: noise_to(x_ref, eps, sigmas[k + 1]))


@pytest.mark.parametrize("method", ["multidiffusion", "mixture"])
def test_shared_denoise_with_pinning_equals_img2img(method):
    steps, d = 8, 0.5
    sigmas, x_ref, eps, z_next = reference_setup(8, 12, steps)
    tiles = grid_tiles(8, 12, tile=6, overlap=2)
    start = starts([d] * len(tiles), steps)
    assert start[0] == 4 and sigmas[4:] == img2img_sigmas(sigmas, d)
    pinned = sample(
        TilePlan(tiles, method=method, start_index=start), noise_to(x_ref, eps, sigmas[0]), sigmas, pin=z_next
    )
    # Plain img2img: start at z_ref(sigma_s), run the same fused tiles from step s.
    plain = sample(TilePlan(tiles, method=method), noise_to(x_ref, eps, sigmas[4]), sigmas, start=4)
    assert torch.equal(pinned, plain)
    assert not torch.allclose(plain, x_ref, atol=1e-2)


def test_zero_denoise_tiles_stay_on_reference():
    steps = 6
    sigmas, x_ref, eps, z_next = reference_setup(8, 8, steps)
    tiles = grid_tiles(8, 8, tile=4, overlap=0)  # TL, TR, BL, BR
    plan = TilePlan(tiles, start_index=starts([0.0, 0.5, 1.0, 0.0], steps))
    x = noise_to(x_ref, eps, sigmas[0])
    for k in range(steps):
        x = euler_step(x, step_velocity(plan, x, sigmas[k], k), sigmas[k], sigmas[k + 1])
        x = pin_to_reference(x, plan.activity(k), z_next(k))
        for t in (tiles[0], tiles[3]):
            assert torch.equal(
                x[..., t.rect.y0 : t.rect.y1, t.rect.x0 : t.rect.x1],
                z_next(k)[..., t.rect.y0 : t.rect.y1, t.rect.x0 : t.rect.x1],
            )
    assert torch.equal(x[..., :4, :4], x_ref[..., :4, :4]) and torch.equal(x[..., 4:, 4:], x_ref[..., 4:, 4:])
    assert not torch.allclose(x[..., :4, 4:], x_ref[..., :4, 4:], atol=1e-2)


def test_quadtree_tiles_with_exact_denoise_run():
    img = torch.full((3, 64, 64), 0.3)
    img[:, 32:, 32:] = (torch.arange(32)[None, :, None] % 2).float()
    leaves = assign_denoise(build_quadtree(img, min_tile=4))
    tiles = quadtree_tiles(leaves, 8, 8, overlap=1)
    denoise = [0.0 if min(leaf.rect.h, leaf.rect.w) < 16 else leaf.denoise for leaf in leaves]
    steps = 4
    sigmas, x_ref, eps, z_next = reference_setup(8, 8, steps)
    plan = TilePlan(tiles, method="mixture", start_index=starts(denoise, steps))
    out = sample(plan, noise_to(x_ref, eps, sigmas[0]), sigmas, pin=z_next)
    assert torch.isfinite(out).all()
    skipped = [t for t, d in zip(tiles, denoise, strict=True) if d == 0.0]
    assert skipped and all(plan.activity(steps - 1)[t.rect.slices()].max() < 1 for t in skipped)


def test_compat_denoise_reproduces_upstream_blend():
    sigmas = get_sigmas(4)
    x, ref = latent(4, 4), latent(4, 4, seed=3)
    tiles = [Tile(Rect(0, 0, 4, 4), 0)]
    v = fake_velocity(x[0])[None]
    # d = 1 -> beta = 1 at every p: identical to the plain plan.
    full = TilePlan(tiles, compat_denoise=[1.0], sigmas=sigmas, reference=ref)
    torch.testing.assert_close(step_velocity(full, x, sigmas[1], 1), v)  # x -> x0 -> v round trip
    # d = 0 at p = 0: x0 := orig - x_in (a displacement, the film-negative bug), so v = (2 x - orig) / sigma.
    zero = TilePlan(tiles, compat_denoise=[0.0], sigmas=sigmas, reference=ref)
    s = sigmas[0]
    vz = step_velocity(zero, x, s, 0)
    torch.testing.assert_close(vz, (2 * x - ref) / s)
    torch.testing.assert_close(x - s * vz, ref - x)  # the implied x0 is not orig: documented as wrong
    # d = 0.4 at sigma index 2 of 4 (p = 0.5): beta = 0.4 + 0.6 * 0.5 = 0.7.
    half = TilePlan(tiles, compat_denoise=[0.4], sigmas=sigmas, reference=ref)
    s = sigmas[2]
    x0 = 0.7 * (x - s * v) + 0.3 * (ref - x)
    torch.testing.assert_close(step_velocity(half, x, s, 2), (x - x0) / s)
    with pytest.raises(ValueError, match="sigmas"):
        TilePlan(tiles, compat_denoise=[0.5], reference=ref)


def test_plan_validation():
    with pytest.raises(ValueError, match="start_index"):
        TilePlan([Tile(Rect(0, 0, 4, 4), 0)], start_index=[0, 1])
    plan = TilePlan([Tile(Rect(0, 0, 4, 4), 0)])
    with pytest.raises(ValueError, match=r"\[1, C, 4, 4\]"):
        plan.views(latent(4, 6), 0.5, 0)
    with pytest.raises(ValueError, match="weight"):  # a gap is an error when every tile is always active
        step_velocity(TilePlan([Tile(Rect(0, 0, 4, 4), 0)], width=6), latent(4, 6))


# SpotDiffusion ---------------------------------------------------------------------------------


def test_spot_shifts_deterministic_and_varying():
    a = SpotPlan(32, 32, tile=8, seed=11)
    shifts = [a.shift(k) for k in range(12)]
    fresh = SpotPlan(32, 32, tile=8, seed=11)
    assert [fresh.shift(k) for k in reversed(range(12))] == shifts[::-1]  # no state: any query order
    assert len(set(shifts)) > 2
    assert [SpotPlan(32, 32, tile=8, seed=12).shift(k) for k in range(12)] != shifts
    for dy, dx in shifts:
        assert dy % 2 == dx % 2 == 0 and 0 <= dy < 8 and 0 <= dx < 8
        assert dy == 0 or dx == 0


def test_spot_axes_alternate():
    plan = SpotPlan(32, 32, tile=8, seed=3)
    both = 0
    for k in range(40):
        raw = plan._axis_shift("h", k), plan._axis_shift("w", k)
        if raw[0] and raw[1]:
            both += 1
            # Square tiles: rows move on odd steps, columns on even steps (upstream's parity rule).
            assert plan.shift(k) == ((raw[0], 0) if k % 2 else (0, raw[1]))
        else:
            assert plan.shift(k) == raw
    assert both > 5
    assert SpotPlan(8, 32, tile=8, seed=3).shift(1)[0] == 0  # one window covers the height


def test_spot_sorted_and_fibonacci():
    assert fibonacci_spacing(list(range(10))) == [0, 1, 2, 3, 4, 5, 7, 8, 6, 9]  # traced by hand
    plan = SpotPlan(32, 32, tile=16, seed=5, mode="sorted", steps=9)
    h = [plan._axis_shift("h", k) for k in range(9)]
    assert h == sorted(h)
    fib = SpotPlan(32, 32, tile=16, seed=5, mode="fibonacci", steps=9)
    assert [fib._axis_shift("h", k) for k in range(9)] == fibonacci_spacing(h)
    with pytest.raises(ValueError, match="steps"):
        SpotPlan(32, 32, tile=16, seed=5, mode="sorted")


def test_spot_offset_grid_covers_every_pixel_once():
    plan = SpotPlan(20, 28, tile=(8, 12), seed=9)
    for k in range(10):
        count = torch.zeros(20, 28)
        for t in plan.tiles_at(k):
            count[t.rect.slices()] += 1
        assert torch.equal(count, torch.ones(20, 28))
        step_velocity(plan, latent(20, 28), 0.5, k)  # coverage check passes


def test_spot_roll_round_trip():
    x = latent(16, 24)
    for wrap in (True, False):
        plan = SpotPlan(16, 24, tile=8, seed=4, wrap=wrap)
        assert any(plan.shift(k) != (0, 0) for k in range(4))  # a missing roll-back would show
        for k in range(4):
            views = plan.views(x, 0.5, k)
            assert torch.equal(plan.fuse(x, [v.x for v in views], 0.5, k), x)  # identity model


def find_step(plan, shift):
    return next(k for k in range(200) if plan.shift(k) == shift)


def test_spot_wrap_step_equals_direct_computation():
    x = latent(16, 16)
    plan = SpotPlan(16, 16, tile=8, seed=2, wrap=True)
    k = find_step(plan, (0, 4))
    rolled = torch.roll(x, shifts=(0, 4), dims=(-2, -1))
    expected = torch.empty_like(x)
    for y in (0, 8):
        for xx in (0, 8):
            expected[0, :, y : y + 8, xx : xx + 8] = fake_velocity(rolled[0, :, y : y + 8, xx : xx + 8])
    assert torch.equal(step_velocity(plan, x, 0.5, k), torch.roll(expected, shifts=(0, -4), dims=(-2, -1)))


def test_spot_offset_step_equals_direct_computation():
    x = latent(8, 8)
    plan = SpotPlan(8, 8, tile=4, seed=2)
    k = find_step(plan, (2, 0))
    rows, cols = [(0, 2), (2, 6), (6, 8)], [(0, 4), (4, 8)]
    assert [(t.rect.y0, t.rect.y1, t.rect.x0, t.rect.x1) for t in plan.tiles_at(k)] == [
        r + c for r in rows for c in cols
    ]
    expected = torch.empty_like(x)
    for y0, y1 in rows:
        for x0, x1 in cols:
            expected[0, :, y0:y1, x0:x1] = fake_velocity(x[0, :, y0:y1, x0:x1])
    assert torch.equal(step_velocity(plan, x, 0.5, k), expected)


def test_spot_on_quadtree_tiles():
    img = torch.zeros(3, 64, 64)
    img[:, :32, :32] = (torch.arange(32) % 2).float()
    tiles = quadtree_tiles(assign_denoise(build_quadtree(img, min_tile=4)), 8, 8, overlap=0)
    plan = SpotPlan(8, 8, tile=4, seed=1, wrap=True, tiles=tiles)
    k = find_step(plan, (2, 0))
    rolled = torch.roll(latent(8, 8), shifts=(2, 0), dims=(-2, -1))
    expected = torch.empty_like(rolled)
    for t in tiles:
        expected[0, :, t.rect.y0 : t.rect.y1, t.rect.x0 : t.rect.x1] = fake_velocity(
            rolled[0, :, t.rect.y0 : t.rect.y1, t.rect.x0 : t.rect.x1]
        )
    got = step_velocity(plan, latent(8, 8), 0.5, k)
    assert torch.equal(got, torch.roll(expected, shifts=(-2, 0), dims=(-2, -1)))
    with pytest.raises(ValueError, match="wrap=True"):
        SpotPlan(8, 8, tile=4, seed=1, tiles=tiles)
