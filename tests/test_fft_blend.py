"""core/upscale/fft_blend.py: Gaussian low-pass FFT blend, area downscale, refinement plan."""

import math

import pytest
import torch

from core.upscale.fft_blend import (
    area_downscale,
    fft_lowpass_blend,
    lowpass_mask,
    refinement_applies,
    refinement_plan,
)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def cosine_pattern(n, freq):
    """[1, 1, n, n] plane wave with `freq` cycles along W (FFT bins at u = +-freq)."""
    j = torch.arange(n, dtype=torch.float32)
    return torch.cos(2 * math.pi * freq * j / n).expand(n, n).reshape(1, 1, n, n).clone()


def test_identity_and_upstream_paths():
    x, y = randn(1, 4, 16, 16), randn(1, 4, 16, 16, seed=1)
    for kwargs in (dict(factor=2.0, blend=0.0), dict(factor=1.0, blend=0.5), dict(factor=5.0, blend=0.5)):
        out, path = fft_lowpass_blend(x, y, **kwargs)  # 16 / 5 < 4 on both sides
        assert path == "identity" and torch.equal(out, x)
    out, path = fft_lowpass_blend(x, y, factor=2.0, blend=1.0)
    assert path == "y_up" and torch.equal(out, y)


def test_same_input_is_fixed_point():
    x = randn(2, 3, 16, 24)
    out, path = fft_lowpass_blend(x, x.clone(), factor=2.0, blend=0.6)
    assert path == "fft" and torch.allclose(out, x, atol=1e-5)


def test_low_frequencies_from_y_high_from_x():
    # x holds only a high-frequency wave (u = 14), y_up only a low one (u = 1). With f = 4 on 32 x 32,
    # sigma_w = 4, so M(1) = exp(-1/32) and M(14) = exp(-12.25 / 2): the output is exactly
    # (1 - b M(14)) x + b M(1) y, since each wave sits on the bins +-u where M is symmetric.
    n, b = 32, 0.8
    x, y = cosine_pattern(n, 14), cosine_pattern(n, 1)
    out, path = fft_lowpass_blend(x, y, factor=4.0, blend=b)
    assert path == "fft"
    m_lo, m_hi = math.exp(-0.5 * (1 / 4) ** 2), math.exp(-0.5 * (14 / 4) ** 2)
    assert torch.allclose(out, (1 - b * m_hi) * x + b * m_lo * y, atol=1e-5)
    # Energies: nearly all of y's low wave arrives, nearly none of x's high wave is lost.
    e_lo = (out * y).sum() / (y * y).sum()
    e_hi = (out * x).sum() / (x * x).sum()
    assert e_lo.item() == pytest.approx(b * m_lo, abs=1e-5) and e_lo > 0.77
    assert e_hi.item() == pytest.approx(1 - b * m_hi, abs=1e-5) and e_hi > 0.99
    # And the base's own low frequencies are replaced: a low wave in x is mostly blended out.
    out2, _ = fft_lowpass_blend(cosine_pattern(n, 1), torch.zeros(1, 1, n, n), factor=4.0, blend=b)
    assert (out2 * y).sum() / (y * y).sum() == pytest.approx(1 - b * m_lo, abs=1e-5)


def test_mask_golden_values():
    # H = W = 16, f = 2 -> sigma = 4, centre at index 8: M = exp(-(u^2 + v^2) / 32).
    m = lowpass_mask(16, 16, 2.0)
    assert m[8, 8].item() == 1.0
    assert m[8, 12].item() == pytest.approx(math.exp(-0.5), rel=1e-6)  # 0.6065307
    assert m[12, 12].item() == pytest.approx(math.exp(-1.0), rel=1e-6)  # 0.3678794
    assert m[0, 0].item() == pytest.approx(math.exp(-4.0), rel=1e-6)  # 0.0183156
    # Non-square: H = 8 (sigma_h = 2), W = 16 (sigma_w = 4).
    m = lowpass_mask(8, 16, 2.0)
    assert m[6, 12].item() == pytest.approx(math.exp(-1.0), rel=1e-6)
    assert m[4, 0].item() == pytest.approx(math.exp(-2.0), rel=1e-6)


def test_dtype_kept_and_5d_paths():
    x, y = randn(1, 4, 16, 16).bfloat16(), randn(1, 4, 16, 16, seed=1).bfloat16()
    out, path = fft_lowpass_blend(x, y, factor=2.0, blend=0.3)
    assert path == "fft" and out.dtype == torch.bfloat16
    x5, y5 = randn(1, 4, 1, 16, 16), randn(1, 4, 1, 16, 16, seed=1)
    out5, path = fft_lowpass_blend(x5, y5, factor=2.0, blend=0.3)
    out4, _ = fft_lowpass_blend(x5[:, :, 0], y5[:, :, 0], factor=2.0, blend=0.3)
    assert path == "fft" and out5.shape == x5.shape and torch.equal(out5[:, :, 0], out4)
    xt, yt = randn(1, 4, 3, 16, 16), randn(1, 4, 3, 16, 16, seed=1)
    out_t, path = fft_lowpass_blend(xt, yt, factor=2.0, blend=0.3)
    assert path == "lerp" and torch.allclose(out_t, 0.7 * xt + 0.3 * yt, atol=1e-6)


def test_blend_validation():
    x = randn(1, 1, 16, 16)
    with pytest.raises(ValueError, match="same shape"):
        fft_lowpass_blend(x, randn(1, 1, 16, 8), factor=2.0, blend=0.5)
    with pytest.raises(ValueError, match="blend must be >= 0"):
        fft_lowpass_blend(x, x, factor=2.0, blend=-0.1)


def test_area_downscale():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert area_downscale(x, 2.0).tolist() == [[[[2.5, 4.5], [10.5, 12.5]]]]  # 2 x 2 block means
    assert area_downscale(randn(1, 2, 10, 7), 3.0).shape == (1, 2, 3, 2)  # round(3.33), round(2.33)
    assert area_downscale(randn(1, 2, 3, 3), 8.0).shape == (1, 2, 1, 1)  # at least 1
    assert area_downscale(randn(1, 2, 3, 8, 8), 2.0).shape == (1, 2, 3, 4, 4)
    assert area_downscale(randn(1, 2, 8, 8).bfloat16(), 2.0).dtype == torch.bfloat16


def test_refinement_plan_and_applies():
    # K = 16 // 2 = 8 steps: the tail of a floor(8 / 0.5) = 16-step schedule.
    assert refinement_plan(128, 96, factor=2.0, steps=16, denoise=0.5) == ((64, 48), 8, 16)
    # round(100 / 3) = 33, round(75 / 3) = 25, down to even: 32 x 24; K = 1; floor(1 / 0.3) = 3.
    assert refinement_plan(100, 75, factor=3.0, steps=3, denoise=0.3, align=2) == ((32, 24), 1, 3)
    # 20 steps at d = 0.3: K = 10 of a 33-step schedule, whose 0.3 tail (ceil(9.9)) is exactly 10.
    assert refinement_plan(64, 64, factor=2.0, steps=20, denoise=0.3) == ((32, 32), 10, 33)
    assert refinement_applies(16, 16, factor=4.0, blend=0.2)
    assert not refinement_applies(15, 16, factor=4.0, blend=0.2)  # 15 / 4 < 4
    assert not refinement_applies(64, 64, factor=1.0, blend=0.2)
    with pytest.raises(ValueError, match="denoise"):
        refinement_plan(64, 64, factor=2.0, steps=8, denoise=0.0)
