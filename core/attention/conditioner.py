"""The sigma/cfg conditioner: per-sample modulation of the student's global branches.

A layer's attention changes along the trajectory (sharp local attention late, broad attention early)
and with the guidance scale, so the student gets both: sinusoidal embeddings of sigma and cfg
(frequencies 10000^(-k / (half - 1)), sin and cos halves, as the transformer's own timestep
embedding), then Linear(2E -> 128), SiLU, Linear(128 -> 6). The six outputs are, per sample,

    kernel   <- kernel   (1 + scale_kernel)   + shift_kernel
    landmark <- landmark (1 + scale_landmark) + shift_landmark
    gate logits += logit_kernel, logit_landmark

The last layer is zero-initialised, so at initialisation every output is exactly 0 and the student
does not depend on sigma or cfg (the conditioner is the identity). The local branch is left alone:
it is the exact base the gates fall back to.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

EMBED_DIM = 32
HIDDEN = 128
SIGMA_SCALE = 1000.0  # sigma in [0, 1]: the highest frequency (1) resolves steps of 0.001, as Flux's timestep
CFG_SCALE = 100.0  # cfg around 1..10: resolves 0.01


def sinusoidal_embedding(x: torch.Tensor, dim: int) -> torch.Tensor:
    """[B] -> [B, dim]: sin(x w_k), cos(x w_k) with w_k = 10000^(-k / (dim/2 - 1)), k < dim/2."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, device=x.device, dtype=torch.float32) / (half - 1)
    )
    angles = x.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class Modulation(NamedTuple):
    """Per-sample modulation, each [B] fp32; all zeros is the identity."""

    scale_kernel: torch.Tensor
    shift_kernel: torch.Tensor
    scale_landmark: torch.Tensor
    shift_landmark: torch.Tensor
    logit_kernel: torch.Tensor
    logit_landmark: torch.Tensor


class Conditioner(nn.Module):
    """(sigma [B], cfg [B]) -> Modulation; the identity at initialisation."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2 * EMBED_DIM, HIDDEN), nn.SiLU(), nn.Linear(HIDDEN, len(Modulation._fields))
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, sigma: torch.Tensor, cfg: torch.Tensor) -> Modulation:
        emb = torch.cat(
            [
                sinusoidal_embedding(sigma * SIGMA_SCALE, EMBED_DIM),
                sinusoidal_embedding(cfg * CFG_SCALE, EMBED_DIM),
            ],
            dim=-1,
        )
        out = self.net(emb.to(self.net[0].weight.dtype)).float()  # [B, 6]
        return Modulation(*out.unbind(dim=-1))


def modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x (1 + scale) + shift with per-sample scale, shift [B] over x [B, ...]; exact for zeros."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    return x * (1.0 + scale.reshape(shape)) + shift.reshape(shape)
