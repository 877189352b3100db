"""core/tiling/dilated.py: DemoFusion's dilated global views (arXiv 2311.16973)."""

import math

import pytest
import torch
import torch.nn.functional as F

from core.rope.spec import RopeSpec
from core.tiling.dilated import DilatedPlan, c2, c3, cosine_factor, fuse_global, gaussian_blur
from core.tiling.views import Plan


def latent(h, w, c=4, seed=0):
    return torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(seed))


def view_model(x):
    """Not pointwise: depends on the view's mean and on a neighbour inside the view."""
    return 2.0 * x + x.mean() + 0.5 * torch.roll(x, 1, dims=-1)


def test_cosine_factors_golden():
    # Hand-derived: cos_f = 0.5 (1 + cos(pi (1 - sigma))) = 1, 0.5, 0 at sigma = 1, 0.5, 0.
    assert [cosine_factor(s) for s in (1.0, 0.5, 0.0)] == pytest.approx([1.0, 0.5, 0.0], abs=1e-15)
    assert [c2(s) for s in (1.0, 0.5, 0.0)] == pytest.approx([1.0, 0.5, 0.0], abs=1e-15)
    assert [c3(s) for s in (1.0, 0.5, 0.0)] == pytest.approx([1.0, 0.505, 0.01], abs=1e-15)
    assert cosine_factor(0.25) == pytest.approx(0.5 * (1 + math.cos(0.75 * math.pi)))
    with pytest.raises(ValueError, match="sigma"):
        cosine_factor(1.5)


def test_fuse_global():
    v_local, v_global = torch.ones(1, 2, 3, 3), torch.full((1, 2, 3, 3), 3.0)
    assert torch.allclose(fuse_global(v_local, v_global, 0.5), torch.full((1, 2, 3, 3), 2.0))
    assert torch.equal(fuse_global(v_local, v_global, 0.0), v_local)
    assert torch.equal(fuse_global(v_local, v_global, 1.0), v_global)
    out = fuse_global(v_local.bfloat16(), v_global.bfloat16(), 0.5)
    assert out.dtype == torch.bfloat16


def test_gaussian_blur_golden_and_reference():
    # Kernel 3, sigma 1: weights [e^-0.5, 1, e^-0.5] / (1 + 2 e^-0.5) = [0.274069, 0.451863, 0.274069].
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 2, 2] = 1.0
    y = gaussian_blur(x, 3, 1.0)
    g = torch.tensor([math.exp(-0.5), 1.0, math.exp(-0.5)])
    g = g / g.sum()
    assert g[0].item() == pytest.approx(0.27406862, abs=1e-8)
    assert torch.allclose(y[0, 0, 1:4, 1:4], torch.outer(g, g), atol=1e-7)
    # Equals a direct 2-D depthwise conv on a reflect-padded input (independent reference).
    x = latent(9, 11, c=3, seed=1)
    k = torch.exp(-((torch.arange(5.0) - 2) ** 2) / (2 * 0.8**2))
    k2 = torch.outer(k, k) / k.sum() ** 2
    ref = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k2.expand(3, 1, 5, 5), groups=3)
    assert torch.allclose(gaussian_blur(x, 5, 0.8), ref, atol=1e-6)
    assert torch.equal(gaussian_blur(x, 1, 1.0), x) and torch.equal(gaussian_blur(x, 3, 0.0), x)


@pytest.mark.parametrize("shape,s", [((8, 12), 2), ((7, 9), 2), ((10, 8), 3), ((5, 5), 1)])
def test_views_tile_every_position_once(shape, s):
    x = latent(*shape)
    plan: Plan = DilatedPlan(s)  # satisfies the (static) Plan protocol
    views = plan.views(x, 0.7, 0)
    assert len(views) == s * s
    hp, wp = -(-shape[0] // s) * s, -(-shape[1] // s) * s
    assert all(v.x.shape == (4, hp // s, wp // s) for v in views)
    # Give view i the constant i + 1: the fused map must show the lattice of view (h, w) = divmod(i, s).
    v = plan.fuse(x, [torch.full_like(vi.x, float(i + 1)) for i, vi in enumerate(views)], 0.7, 0)
    assert v.shape == x.shape
    pad_h, pad_w = hp - shape[0], wp - shape[1]
    rows = (torch.arange(shape[0]) + pad_h) % s
    cols = (torch.arange(shape[1]) + pad_w) % s
    expected = (rows[:, None] * s + cols[None, :] + 1).float()
    assert torch.equal(v[0, 0], expected)


def test_tiny_blur_equals_model_on_each_sublattice():
    s, x = 2, latent(8, 10, seed=3)
    plan = DilatedPlan(s, blur_sigma=1e-8)
    views = plan.views(x, 0.9, 0)
    fused = plan.fuse(x, [view_model(v.x) for v in views], 0.9, 0)
    expected = torch.empty_like(x)
    for h in range(s):
        for w in range(s):
            expected[0, :, h::s, w::s] = view_model(x[0, :, h::s, w::s])
    # Only the re-standardisation's float rounding separates the two.
    assert torch.allclose(fused, expected, atol=1e-5)


def test_padding_is_reflect_at_top_left():
    x = latent(7, 9, seed=4)
    views = DilatedPlan(2, blur_sigma=1e-8).views(x, 0.5, 0)
    # Padded row 0 reflects x's row 1; view (0, 1) takes padded columns 1, 3, ... = x columns 0, 2, ...
    assert torch.allclose(views[1].x[:, 0, :], x[0, :, 1, 0::2], atol=1e-5)
    # View (1, 1) is x's even rows and even columns, unpadded.
    assert torch.allclose(views[3].x, x[0, :, 0::2, 0::2], atol=1e-5)


def test_model_sees_blurred_restandardised_views():
    s, sigma, x = 2, 1.0, latent(12, 12, seed=5)
    plan = DilatedPlan(s, blur_sigma=1.0)
    views = plan.views(x, sigma, 0)
    z_g = plan.fuse(x, [v.x for v in views], sigma, 0)  # reassembled model input
    blurred = gaussian_blur(x, 3, 1.0 * c3(sigma))
    expected = (blurred - blurred.mean()) / blurred.std() * x.std() + x.mean()
    assert torch.allclose(z_g, expected, atol=1e-5)
    assert z_g.mean().item() == pytest.approx(x.mean().item(), abs=1e-5)
    assert z_g.std().item() == pytest.approx(x.std().item(), rel=1e-5)
    assert not torch.allclose(z_g, x, atol=1e-2)  # the blur did something


def test_restandardisation_uses_the_padded_latent():
    s, x = 3, latent(10, 8, seed=6)
    plan = DilatedPlan(s, blur_sigma=1.0)
    views = plan.views(x, 0.6, 0)
    padded = F.pad(x, (1, 0, 2, 0), mode="reflect")  # 10 -> 12, 8 -> 9
    z_g = torch.empty_like(padded)
    for i, v in enumerate(views):
        h, w = divmod(i, s)
        z_g[0, :, h::s, w::s] = v.x
    assert z_g.mean().item() == pytest.approx(padded.mean().item(), abs=1e-5)
    assert z_g.std().item() == pytest.approx(padded.std().item(), rel=1e-5)


def test_views_do_not_depend_on_the_thread_count():
    """The scalar statistics of the re-standardisation are whole-tensor reductions, which torch splits
    across threads: in float32 a 4-thread driver gave 215,844 of these 524,288 values another rounding
    than a 1-thread one (measured before the statistics went to float64)."""
    x = latent(128, 128, c=32, seed=7) * 1.3 + 0.2
    plan = DilatedPlan(2, blur_sigma=1.0)
    before = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            runs.append(torch.stack([v.x for v in plan.views(x, 0.8, 0)]))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(runs[0], r) for r in runs[1:])


def test_rope_attached_only_beyond_native_grid():
    spec = RopeSpec(method="yarn")
    x = latent(16, 16)
    assert all(v.rope == spec for v in DilatedPlan(2, rope=spec, native_size=4).views(x, 0.5, 0))
    assert all(v.rope is None for v in DilatedPlan(2, rope=spec, native_size=8).views(x, 0.5, 0))
    assert all(v.rope == spec for v in DilatedPlan(2, rope=spec).views(x, 0.5, 0))


def test_dtype_and_validation():
    x = latent(8, 8).bfloat16()
    plan = DilatedPlan(2)
    views = plan.views(x, 0.5, 0)
    assert all(v.x.dtype == torch.bfloat16 for v in views)
    assert plan.fuse(x, [v.x for v in views], 0.5, 0).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="factor"):
        DilatedPlan(0)
    with pytest.raises(ValueError, match="blur_sigma"):
        DilatedPlan(2, blur_sigma=-1.0)
    with pytest.raises(ValueError, match="4 view outputs"):
        plan.fuse(x, [v.x for v in views[:3]], 0.5, 0)
    with pytest.raises(ValueError, match="single latent"):
        plan.views(torch.zeros(2, 4, 8, 8), 0.5, 0)
