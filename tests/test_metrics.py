"""Tests for core.eval.metrics: hand-derived golden numbers and an independent SSIM reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.eval.metrics import (
    border_mask_from_boxes,
    channel_stats,
    high_frequency_ratio,
    luminance,
    psnr,
    seam_score,
    ssim,
)
from core.flow.seeds import cpu_generator

pytestmark = pytest.mark.cpu


def _rand(shape, seed):
    return torch.rand(shape, generator=cpu_generator(seed), dtype=torch.float64)


def _gray(y: torch.Tensor) -> torch.Tensor:
    """[H, W] -> [1, 3, H, W] with R = G = B = y, so the luma is y (weights sum to 1)."""
    return y.expand(1, 3, *y.shape).clone()


# ----------------------------------------------------------------------------------------------- PSNR


def test_psnr_constant_pair_is_20_db():
    # MSE = 0.1^2 = 0.01, so 10 log10(1 / 0.01) = 20 dB exactly (float64 inputs).
    a = torch.full((3, 8, 8), 0.5, dtype=torch.float64)
    assert psnr(a, a + 0.1) == pytest.approx(20.0, abs=1e-12)
    # max_val scales the peak: 10 log10(4 / 0.01) = 20 + 20 log10(2).
    assert psnr(a, a + 0.1, max_val=2.0) == pytest.approx(20 + 20 * math.log10(2), abs=1e-12)


def test_psnr_batch_mean_and_identity():
    a = torch.full((2, 3, 4, 4), 0.5, dtype=torch.float64)
    b = a.clone()
    b[0] += 0.1  # 20 dB
    b[1] += 0.01  # 40 dB
    assert psnr(a, b) == pytest.approx(30.0, abs=1e-10)
    assert psnr(a, a) == math.inf


def test_psnr_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="equal shapes"):
        psnr(torch.zeros(3, 4, 4), torch.zeros(3, 4, 5))


# ----------------------------------------------------------------------------------------------- SSIM


def _ssim_loops(a: np.ndarray, b: np.ndarray) -> float:
    """Independent SSIM (Wang et al. 2004) on [3, H, W] float64: explicit 2-D window, two-pass moments."""
    ya = 0.299 * a[0] + 0.587 * a[1] + 0.114 * a[2]
    yb = 0.299 * b[0] + 0.587 * b[1] + 0.114 * b[2]
    r = np.arange(11) - 5
    win = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 1.5**2))
    win /= win.sum()
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    for i in range(ya.shape[0] - 10):
        for j in range(ya.shape[1] - 10):
            pa, pb = ya[i : i + 11, j : j + 11], yb[i : i + 11, j : j + 11]
            ma, mb = (win * pa).sum(), (win * pb).sum()
            va = (win * (pa - ma) ** 2).sum()
            vb = (win * (pb - mb) ** 2).sum()
            cov = (win * (pa - ma) * (pb - mb)).sum()
            vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_matches_independent_loop_implementation():
    a = _rand((3, 23, 19), 1)
    # A correlated, distorted copy: blur plus noise plus a brightness shift, clamped to [0, 1].
    b = (F.avg_pool2d(a[None], 3, stride=1, padding=1)[0] + 0.1 * _rand((3, 23, 19), 2) - 0.05).clamp(0, 1)
    ref = _ssim_loops(a.numpy(), b.numpy())
    assert 0.05 < ref < 0.95  # a non-trivial pair
    assert ssim(a, b) == pytest.approx(ref, abs=1e-6)


def test_ssim_constant_images_golden():
    # Constant images: variances and covariance are 0, so SSIM = (2 m1 m2 + C1) / (m1^2 + m2^2 + C1).
    a = torch.full((3, 16, 16), 0.5, dtype=torch.float64)
    expected = (2 * 0.5 * 0.6 + 1e-4) / (0.25 + 0.36 + 1e-4)
    assert ssim(a, a + 0.1) == pytest.approx(expected, abs=1e-12)


def test_ssim_properties():
    x = _rand((2, 3, 32, 32), 3)
    y = (x + 0.1 * torch.randn(x.shape, generator=cpu_generator(4), dtype=torch.float64)).clamp(0, 1)
    z = (x + 0.3 * torch.randn(x.shape, generator=cpu_generator(5), dtype=torch.float64)).clamp(0, 1)
    assert ssim(x, x) == 1.0
    assert ssim(x, y) == pytest.approx(ssim(y, x), abs=1e-14)
    assert 1.0 > ssim(x, y) > ssim(x, z)
    # [3, H, W] is a batch of one; float32 inputs are promoted.
    assert ssim(x[0].float(), y[0].float()) == pytest.approx(ssim(x[:1], y[:1]), abs=1e-6)


def test_ssim_rejects_small_images():
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(3, 10, 20), torch.zeros(3, 10, 20))


def test_luminance_weights():
    img = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1) * torch.ones(3, 2, 2)
    assert torch.allclose(luminance(img), torch.full((1, 1, 2, 2), 0.299, dtype=torch.float64))


# ----------------------------------------------------------------------------------- high-frequency ratio


def _cosine(n: int, cycles: int, amp: float) -> torch.Tensor:
    """0.5 + amp cos along x with `cycles` periods over n pixels: frequency 2 * cycles / n of Nyquist."""
    x = torch.arange(n, dtype=torch.float64)
    return (0.5 + amp * torch.cos(2 * math.pi * cycles * x / n)).expand(n, n)


def test_high_frequency_ratio_identity_and_amplitude_golden():
    x = _rand((3, 64, 64), 6)
    assert high_frequency_ratio(x, x) == 1.0
    # 20 cycles / 64 px = 0.625 Nyquist, above the cutoff; halving the amplitude quarters the energy.
    # The mean is removed and the periodic Hann window spreads a tone over +-1 bin only, so it is exact.
    ref, half = _gray(_cosine(64, 20, 0.4)), _gray(_cosine(64, 20, 0.2))
    assert high_frequency_ratio(half, ref) == pytest.approx(0.25, abs=1e-12)


def test_high_frequency_ratio_cutoff_is_fraction_of_nyquist():
    # A tone at 10 cycles / 64 px = 0.3125 Nyquist (window leakage reaches +-1 bin: 0.28 .. 0.34).
    low = _gray(_cosine(64, 2, 0.2))  # 0.0625 Nyquist: below any cutoff used here
    tone = _gray(_cosine(64, 10, 0.2) + _cosine(64, 2, 0.2) - 0.5)
    assert high_frequency_ratio(low, tone, cutoff=0.25) < 1e-20
    with pytest.raises(ValueError, match="no spectral energy"):
        high_frequency_ratio(tone, low, cutoff=0.25)
    with pytest.raises(ValueError, match="no spectral energy"):
        high_frequency_ratio(tone, tone, cutoff=0.4)  # the tone is below 0.4 Nyquist


def test_high_frequency_ratio_bicubic_upscale_is_well_below_one():
    checker = ((torch.arange(64)[:, None] // 2 + torch.arange(64)[None, :] // 2) % 2).double()
    img = (0.5 * _gray(checker) + 0.5 * _rand((1, 3, 64, 64), 7)).clamp(0, 1)
    down = F.interpolate(img, scale_factor=0.25, mode="bicubic", antialias=True)
    up = F.interpolate(down, scale_factor=4, mode="bicubic").clamp(0, 1)
    assert high_frequency_ratio(up, img) < 0.2
    assert high_frequency_ratio(img, up) > 5.0


def test_high_frequency_ratio_rejects_bad_cutoff():
    x = _rand((3, 16, 16), 8)
    with pytest.raises(ValueError, match="cutoff"):
        high_frequency_ratio(x, x, cutoff=0.0)


# ------------------------------------------------------------------------------------------ seam score


def test_border_mask_marks_interior_edges_only():
    boxes = [(0, 0, 4, 4), (0, 4, 4, 4), (4, 0, 4, 4), (4, 4, 4, 4)]
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[3:5, :] = True
    expected[:, 3:5] = True
    assert torch.equal(border_mask_from_boxes(8, 8, boxes), expected)
    # width_px = 2 marks two pixels on each side; image borders (row/col 0 and 7) stay clear elsewhere.
    wide = border_mask_from_boxes(8, 8, boxes, width_px=2)
    assert torch.equal(wide[:, 2:6].all(dim=0), torch.ones(4, dtype=torch.bool))
    assert not wide[0, :2].any() and not wide[7, 6:].any()
    # One box covering the image has no interior edge.
    assert not border_mask_from_boxes(8, 8, [(0, 0, 8, 8)]).any()


def test_border_mask_overlapping_boxes_and_validation():
    # Two overlapping tiles along x: left edge of the second at x=3, right edge of the first at x=5.
    mask = border_mask_from_boxes(4, 8, [(0, 0, 4, 5), (0, 3, 4, 5)])
    assert mask[:, 2:6].all() and not mask[:, :2].any() and not mask[:, 6:].any()
    with pytest.raises(ValueError, match="outside"):
        border_mask_from_boxes(8, 8, [(0, 4, 4, 5)])


def test_seam_score_ramp_with_step_golden():
    # Y = a x + d [x >= c]: gx = a everywhere except gx = a + d at x = c - 1, gy = 0. The mask holds
    # columns c - 1 and c, so the score is ((a + d)^2 + a^2) / 2 / a^2 = 61 for a = 0.01, d = 0.1.
    a, d, c, n = 0.01, 0.1, 16, 32
    x = torch.arange(n, dtype=torch.float64)
    img = _gray((a * x + d * (x >= c).double()).expand(n, n))  # bool * float would be float32
    mask = border_mask_from_boxes(n, n, [(0, 0, n, c), (0, c, n, n - c)])
    assert seam_score(img, mask) == pytest.approx(61.0, rel=1e-9)
    # Without the step the gradient is uniform: exactly 1.
    assert seam_score(_gray((a * x).expand(n, n)), mask) == pytest.approx(1.0, rel=1e-9)


def test_seam_score_noise_near_one_and_step_far_above():
    n, c = 128, 64
    boxes = [(y, x, c, c) for y in (0, c) for x in (0, c)]
    mask = border_mask_from_boxes(n, n, boxes)
    noise = _rand((1, 3, n, n), 9)
    assert 0.85 < seam_score(noise, mask) < 1.15
    smooth = 0.5 + 0.01 * (noise - 0.5)
    stepped = smooth.clone()
    stepped[..., c:] += 0.1  # a 1-px step along the interior vertical tile border
    assert seam_score(stepped, mask) > 50.0


def test_seam_score_validation():
    img = torch.zeros(3, 8, 8)
    with pytest.raises(ValueError, match="border_mask must be bool"):
        seam_score(img, torch.zeros(8, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="some but not all"):
        seam_score(img, torch.zeros(8, 8, dtype=torch.bool))
    # Flat image: no gradient anywhere reads as no seam.
    assert seam_score(img, border_mask_from_boxes(8, 8, [(0, 0, 8, 4), (0, 4, 8, 4)])) == 1.0


# --------------------------------------------------------------------------------------- channel stats


def test_channel_stats_hand_values():
    latent = torch.zeros(2, 2, 1, 2)
    latent[:, 0] = torch.tensor([[1.0, 3.0]])  # channel 0: values 1, 3, 1, 3 -> mean 2, std 1
    latent[0, 1] = 5.0  # channel 1: values 5, 5, 0, 0 -> mean 2.5, std 2.5
    stats = channel_stats(latent)
    assert stats == {"mean": [2.0, 2.5], "std": [1.0, 2.5]}
