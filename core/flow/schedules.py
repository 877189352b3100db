"""Flow-matching conventions and sigma schedules (rectified flow, Flux.1 reference sampling).

sigma in [0, 1] is flow time: x_sigma = (1 - sigma) * x0 + sigma * eps, and the model predicts the
velocity v = eps - x0. Schedules are plain lists of floats, descending, ending at 0.

Decisions:
- The resolution-dependent shift mu(L) of the Flux reference (`src/flux/sampling.py`) is a line
  through (256 tokens, 0.5) and (4096 tokens, 1.15). The reference does not clamp it, which at
  4096^2 gives mu = 11.55 and a schedule stuck at sigma ~ 1; we clamp at 1.15 (as DyPE does).
- img2img starts follow diffusers `get_timesteps`: the schedule suffix from int(N - N * denoise).
"""

from __future__ import annotations

import math

import torch

MU_BASE, MU_MAX = 0.5, 1.15
TOKENS_BASE, TOKENS_MAX = 256, 4096


def noise_to(x0: torch.Tensor, eps: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """Forward process: x_sigma = (1 - sigma) x0 + sigma eps."""
    return (1 - sigma) * x0 + sigma * eps


def x0_from_velocity(x: torch.Tensor, sigma: float | torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Predicted clean sample x0_hat = x_sigma - sigma v."""
    return x - sigma * v


def velocity_from_x0(x: torch.Tensor, sigma: float | torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Velocity that points from x_sigma to x0: v = (x_sigma - x0) / sigma, for sigma > 0."""
    return (x - x0) / sigma


def mu_for_tokens(tokens: int, *, clamp: bool = True) -> float:
    """Flux's resolution-dependent shift: mu(L) = 0.5 + 0.65 (L - 256) / 3840, clamped at 1.15."""
    mu = MU_BASE + (MU_MAX - MU_BASE) / (TOKENS_MAX - TOKENS_BASE) * (tokens - TOKENS_BASE)
    return min(mu, MU_MAX) if clamp else mu


def time_shift(t: float, mu: float) -> float:
    """sigma = e^mu / (e^mu + (1/t - 1)), i.e. a static shift s = e^mu: s t / (1 + (s - 1) t)."""
    if t <= 0.0:
        return 0.0
    if t >= 1.0:
        return 1.0
    return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))


def get_sigmas(steps: int, mu: float = 0.0) -> list[float]:
    """steps + 1 descending sigmas from 1 to 0 on a linear grid, time-shifted by mu (0 = unshifted)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return [time_shift(1.0 - k / steps, mu) for k in range(steps + 1)]


def img2img_sigmas(sigmas: list[float], denoise: float) -> list[float]:
    """The suffix of a full schedule that an img2img pass of strength `denoise` runs (diffusers rule).

    With N steps, init = min(N * denoise, N) and the pass starts at index int(N - init). A denoise
    that rounds to zero steps returns [sigma_N] (nothing to run).
    """
    if not 0.0 <= denoise <= 1.0:
        raise ValueError(f"denoise must be in [0, 1], got {denoise}")
    n = len(sigmas) - 1
    start = int(n - min(n * denoise, n))
    return sigmas[start:]


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """x_{sigma'} = x_sigma + (sigma' - sigma) v."""
    return x + (sigma_next - sigma) * v
