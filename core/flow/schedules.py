"""Flow-matching conventions and sigma schedules (rectified flow, Flux.1 reference sampling).

sigma in [0, 1] is flow time: x_sigma = (1 - sigma) * x0 + sigma * eps, and the model predicts the
velocity v = eps - x0. Schedules are plain lists of floats, descending, ending at 0.

Decisions:
- The resolution-dependent shift mu(L) of the Flux reference (`src/flux/sampling.py`) is a line
  through (256 tokens, 0.5) and (4096 tokens, 1.15). The reference does not clamp it, which at
  4096^2 gives mu = 11.55 and a schedule stuck at sigma ~ 1; we clamp at 1.15 (as DyPE does).
- img2img starts follow diffusers `get_timesteps` (a pass of strength d over an N-step schedule
  runs its last ceil(N d) steps), with a tolerance of 1e-9 steps so that float products such as
  0.7 * 10 = 7.000000000000001 run 7 steps, not 8. `img2img_start` is the one place this rule
  lives: phases, per-tile starts (exact per-tile denoise) and the refinement pass all use it.
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


def img2img_start(steps: int, denoise: float) -> int:
    """Index in an N-step schedule where an img2img pass of strength d starts: N - ceil(N d).

    diffusers `get_timesteps` (init = min(N d, N), start = int(N - init)) with a 1e-9 tolerance on
    N d (module docstring). d = 1 starts at 0 (pure noise), d = 0 at N (nothing runs).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 <= denoise <= 1.0:
        raise ValueError(f"denoise must be in [0, 1], got {denoise}")
    return steps - min(steps, math.ceil(steps * denoise - 1e-9))


def img2img_sigmas(sigmas: list[float], denoise: float) -> list[float]:
    """The suffix of a full schedule that an img2img pass of strength `denoise` runs (`img2img_start`).

    A denoise that rounds to zero steps returns [sigma_N] (nothing to run).
    """
    return sigmas[img2img_start(len(sigmas) - 1, denoise) :]


def img2img_schedule_steps(run_steps: int, denoise: float) -> int:
    """Length N of the schedule whose img2img tail at strength d is `run_steps` long: floor(K / d).

    ComfyUI's KSampler reading of (steps K, denoise d), which the FlowMatching-Upscaler's refinement
    pass uses: K steps are run, from the sigma a d-strength pass starts at. img2img_start(N, d) = N - K
    because K - d < N d <= K.
    """
    if run_steps < 1 or not 0.0 < denoise <= 1.0:
        raise ValueError(f"need run_steps >= 1 and denoise in (0, 1], got {run_steps} and {denoise}")
    return math.floor(run_steps / denoise + 1e-9)


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """x_{sigma'} = x_sigma + (sigma' - sigma) v."""
    return x + (sigma_next - sigma) * v
