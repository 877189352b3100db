"""The distillation loss of one layer: Smooth-L1 and cosine distance to the teacher's attention output,
weighted by learned homoscedastic uncertainties (Kendall, Gal and Cipolla, arXiv 1705.07115).

For the student's output y and the teacher's t, both [B, H, Nq, D]:

    L1   = mean over every element of SmoothL1_beta(y - t)
           (0.5 x^2 / beta where |x| < beta, else |x| - beta / 2; beta = 0.05)
    Lcos = 1 - mean over (b, h, i) of cos(y[b, h, i], t[b, h, i])      cosine along the head dim D
    L    = exp(-s1) L1 + s1 + exp(-s2) Lcos + s2

with s1, s2 learned log-variances (initialised to 0). Each term's weight exp(-s) settles where
exp(-s) L = 1, i.e. it normalises the term by its own size; the +s keeps the weight from going to 0.
When a term goes to 0 its optimal weight grows without bound, so s is clamped to [logvar_min,
logvar_max] in the loss and projected back into that range after each optimiser step
(`KendallWeights.project_`): inside the range the clamp is the identity and its gradient flows; at
the bounds it still flows inwards. Also reported, not optimised: NMSE = mean (y - t)^2 / mean t^2.
Everything is computed in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, kw_only=True)
class DistillLossConfig:
    beta: float = 0.05
    logvar_min: float = -4.0
    logvar_max: float = 4.0

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ValueError(f"loss.beta must be > 0, got {self.beta}")
        if not self.logvar_min < self.logvar_max:
            raise ValueError(
                f"loss.logvar_min must be < logvar_max ({self.logvar_max}), got {self.logvar_min}"
            )
        if not self.logvar_min <= 0.0 <= self.logvar_max:
            raise ValueError(
                f"loss.logvar_min, logvar_max = [{self.logvar_min}, {self.logvar_max}] must hold 0 (the init)"
            )


class LossParts(NamedTuple):
    """total (0-d, with gradient) and the detached 0-d parts: smooth_l1, cosine_distance, nmse."""

    total: torch.Tensor
    smooth_l1: torch.Tensor
    cosine_distance: torch.Tensor
    nmse: torch.Tensor


class KendallWeights(nn.Module):
    """The two log-variances s_l1 and s_cos, initialised to 0."""

    def __init__(self) -> None:
        super().__init__()
        self.s_l1 = nn.Parameter(torch.zeros(()))
        self.s_cos = nn.Parameter(torch.zeros(()))

    def clamped(self, cfg: DistillLossConfig) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            self.s_l1.clamp(cfg.logvar_min, cfg.logvar_max),
            self.s_cos.clamp(cfg.logvar_min, cfg.logvar_max),
        )

    @torch.no_grad()
    def project_(self, cfg: DistillLossConfig) -> None:
        """Clamp the stored values into the range (after an optimiser step), so none drifts past it."""
        self.s_l1.clamp_(cfg.logvar_min, cfg.logvar_max)
        self.s_cos.clamp_(cfg.logvar_min, cfg.logvar_max)


def cosine_distance(out: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - mean over (b, h, i) of the cosine along the last dim: 0-d fp32."""
    return 1.0 - F.cosine_similarity(out.float(), teacher.float(), dim=-1).mean()


def nmse(out: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """mean (out - teacher)^2 / mean teacher^2: 0-d fp32 (inf for an all-zero teacher)."""
    t = teacher.float()
    return (out.float() - t).square().mean() / t.square().mean()


def distill_loss(
    out: torch.Tensor, teacher: torch.Tensor, weights: KendallWeights, cfg: DistillLossConfig
) -> LossParts:
    """The Kendall-weighted loss of student output `out` against `teacher`, both [B, H, Nq, D]."""
    if out.shape != teacher.shape or out.ndim != 4:
        raise ValueError(
            f"distill_loss needs out and teacher of one shape [B, H, Nq, D], got "
            f"{tuple(out.shape)} and {tuple(teacher.shape)}"
        )
    y, t = out.float(), teacher.float()
    l1 = F.smooth_l1_loss(y, t, beta=cfg.beta)
    lcos = cosine_distance(y, t)
    s1, s2 = weights.clamped(cfg)
    total = torch.exp(-s1) * l1 + s1 + torch.exp(-s2) * lcos + s2
    return LossParts(total, l1.detach(), lcos.detach(), nmse(y.detach(), t))
