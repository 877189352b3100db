"""Dilated refinement blend: low frequencies from a downscaled pass, high ones from the base.

The FlowMatching-Upscaler's dilated refinement (ttulttul/ComfyUI-FlowMatching-Upscaler, MIT;
reimplemented from its description in docs/upscale.md). The refinement pass itself (area down by
f -> re-noise to the strength d -> sample -> bicubic up) is run by the upscale task with the
sampler; this module holds the pure pieces: its geometry and step count (`refinement_plan`), the
area downscale and the Gaussian low-pass FFT blend.

Decisions:
- The pass runs K = max(1, steps // 2) steps of a phase of `steps` (its FULL schedule) at strength
  d, read as ComfyUI's sampler reads (steps, denoise): the last K steps of a floor(K / d)-step
  schedule. So it starts at the sigma a d-strength pass starts at and never at sigma = 1 for d < 1.
- The pass is skipped (identity) when b = 0, f <= 1, H/f < 4 or W/f < 4, on the unrounded
  H/f (upstream tests the rounded low size, i.e. H/f < 3.5).
- The mask uses upstream's centred coordinates u = j - W/2, v = i - H/2 (float W/2), so for odd
  sizes the mask centre sits half a bin off the DC bin, as upstream.
- A 5-D latent with T = 1 is squeezed and restored once (upstream unsqueezes twice there, which
  returns a 6-D tensor); T > 1 falls back to lerp.
- `fft_lowpass_blend` returns which path ran, so the job record can say so.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from core.flow.schedules import img2img_schedule_steps

BlendPath = Literal["identity", "y_up", "fft", "lerp"]
MIN_LOW_SIDE = 4  # latent pixels; below this the downscaled pass carries no useful structure


def refinement_applies(height: int, width: int, *, factor: float, blend: float) -> bool:
    """Whether the dilated refinement changes anything: b > 0, f > 1, H/f >= 4 and W/f >= 4."""
    return blend > 0.0 and factor > 1.0 and height / factor >= MIN_LOW_SIDE and width / factor >= MIN_LOW_SIDE


class RefinementPlan(NamedTuple):
    """The downscaled pass: its latent size, the K steps it runs and the schedule they end."""

    low: tuple[int, int]
    steps: int
    schedule_steps: int


def refinement_plan(
    height: int, width: int, *, factor: float, steps: int, denoise: float, align: int = 1
) -> RefinementPlan:
    """The refinement pass of a phase of `steps` (full schedule) on a height x width latent.

    low = (round(H/f), round(W/f)) rounded down to a multiple of `align` (at least align); K =
    max(1, steps // 2); schedule_steps = floor(K / d), whose img2img tail at d is K steps long
    (core.flow.schedules.img2img_schedule_steps).
    """
    if factor <= 0:
        raise ValueError(f"fft_factor must be > 0, got {factor}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"fft_denoise must be in (0, 1], got {denoise}")
    low_h, low_w = (max(align, v // align * align) for v in _low_size(height, width, factor))
    run = max(1, steps // 2)
    return RefinementPlan((low_h, low_w), run, img2img_schedule_steps(run, denoise))


def area_downscale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Area (box-average) resize of x [B, C, H, W] (or [B, C, T, H, W], per frame) to
    (round(H/f), round(W/f)), each at least 1. Averages in float32, returns x's dtype.
    """
    if factor <= 0:
        raise ValueError(f"downscale factor must be > 0, got {factor}")
    if x.ndim == 5:
        b, c, t, h, w = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        low = area_downscale(frames, factor)
        return low.reshape(b, t, c, *low.shape[-2:]).permute(0, 2, 1, 3, 4)
    if x.ndim != 4:
        raise ValueError(f"area_downscale expects [B, C, H, W] or [B, C, T, H, W], got {tuple(x.shape)}")
    size = _low_size(x.shape[-2], x.shape[-1], factor)
    return F.interpolate(x.float(), size=size, mode="area").to(x.dtype)


def lowpass_mask(
    height: int, width: int, factor: float, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """Centred Gaussian low-pass mask M [H, W] float32 (DC at (H/2, W/2) after fftshift).

    M = exp(-1/2 [(u / sigma_w)^2 + (v / sigma_h)^2]), u = j - W/2, v = i - H/2,
    sigma_w = W / (2f), sigma_h = H / (2f).
    """
    sigma_h, sigma_w = height / (2.0 * factor), width / (2.0 * factor)
    v = torch.arange(height, dtype=torch.float32, device=device) - height / 2.0
    u = torch.arange(width, dtype=torch.float32, device=device) - width / 2.0
    return torch.exp(-0.5 * ((u[None, :] / sigma_w) ** 2 + (v[:, None] / sigma_h) ** 2))


def fft_lowpass_blend(
    x: torch.Tensor, y_up: torch.Tensor, *, factor: float, blend: float
) -> tuple[torch.Tensor, BlendPath]:
    """Blend y_up's low frequencies into x: (out, path) with out in x's dtype.

    out = Re(ifft2(ifftshift(X (1 - b M) + Y b M))), X, Y = fftshift(fft2(.)) of x and y_up in
    float32, M = `lowpass_mask(H, W, f)`. Paths: "identity" (see `refinement_applies`), "y_up"
    (b >= 1, as upstream), "fft", and "lerp" (lerp(x, y_up, b) for 5-D latents with T > 1).
    x, y_up: [B, C, H, W] or [B, C, T, H, W] of equal shape.
    """
    if x.shape != y_up.shape:
        raise ValueError(f"x and y_up must have the same shape, got {tuple(x.shape)} vs {tuple(y_up.shape)}")
    if x.ndim not in (4, 5):
        raise ValueError(f"fft_lowpass_blend expects [B, C, H, W] or [B, C, T, H, W], got {tuple(x.shape)}")
    if not blend >= 0.0:  # also rejects NaN
        raise ValueError(f"dilated.blend must be >= 0, got {blend}")
    height, width = x.shape[-2], x.shape[-1]
    if not refinement_applies(height, width, factor=factor, blend=blend):
        return x, "identity"
    if blend >= 1.0:
        return y_up.to(x.dtype), "y_up"
    if x.ndim == 5:
        if x.shape[2] != 1:
            return torch.lerp(x.float(), y_up.float(), blend).to(x.dtype), "lerp"
        out, path = fft_lowpass_blend(x.squeeze(2), y_up.squeeze(2), factor=factor, blend=blend)
        return out.unsqueeze(2), path
    dims = (-2, -1)
    spec_x = torch.fft.fftshift(torch.fft.fft2(x.float(), dim=dims), dim=dims)
    spec_y = torch.fft.fftshift(torch.fft.fft2(y_up.float(), dim=dims), dim=dims)
    m = blend * lowpass_mask(height, width, factor, device=x.device)  # [H, W], broadcast over B, C
    mixed = spec_x * (1.0 - m) + spec_y * m
    out = torch.fft.ifft2(torch.fft.ifftshift(mixed, dim=dims), dim=dims).real
    return out.to(x.dtype), "fft"


def _low_size(height: int, width: int, factor: float) -> tuple[int, int]:
    return max(1, round(height / factor)), max(1, round(width / factor))
