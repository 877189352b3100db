"""Generation from noise (text-to-image, or the reference model's unconditional sampling).

A generation at a latent of h x w pixels (Flux packs 2 x 2 latent pixels per token) starts from
standard normal noise drawn on a CPU generator keyed by (seed, "generate"), so one seed gives the
same start on any device and worker, and integrates the flow from sigma = 1 to 0 on the Flux
reference schedule: a linear grid time-shifted by mu(L) for L image tokens, clamped at 1.15
(core/flow/schedules.py), unless the caller fixes mu.
"""

from __future__ import annotations

import torch

from core.flow.schedules import get_sigmas, mu_for_tokens
from core.flow.seeds import derive_seed, gaussian_noise


def generation_sigmas(
    latent_h: int, latent_w: int, steps: int, *, patch: int = 2, mu: float | None = None
) -> list[float]:
    """steps + 1 sigmas from 1 to 0 for a latent of latent_h x latent_w pixels."""
    tokens = (latent_h // patch) * (latent_w // patch)
    return get_sigmas(steps, mu_for_tokens(tokens) if mu is None else mu)


def generation_noise(channels: int, latent_h: int, latent_w: int, seed: int) -> torch.Tensor:
    """The start latent [1, C, h, w] (float32, CPU) of the generation with `seed`."""
    return gaussian_noise((1, channels, latent_h, latent_w), derive_seed(seed, "generate"))
