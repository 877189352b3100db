"""The rectified-flow training objective: logit-normal times, the velocity loss, a fixed validation set.

Rectified flow (Liu, Gong and Liu 2022, arXiv 2209.03003) with the flow-matching conventions of
core/flow/schedules.py: x_t = (1 - t) x0 + t eps and the target velocity v = eps - x0; the loss is
mean ||v_theta(x_t, t) - (eps - x0)||^2 over every element. Training times are logit-normal
(Esser et al. 2024, SD3, arXiv 2403.03206 §3.1): t = sigmoid(m + s n), n ~ N(0, 1), so the median
is sigmoid(m) = 1/2 for m = 0 and the middle times, where the velocity is hardest to predict, are
sampled most.

Decisions:
- Every draw (t and eps) is made on a CPU generator keyed by one seed (core.flow.seeds), in float32 at
  the batch's full shape; the caller moves it. A training step keys it by (job seed, step), so a
  resumed run draws exactly what an uninterrupted one does.
- Validation uses a FIXED (t, eps) per validation crop, drawn once: the loss then measures the
  model alone, without sampling noise between evaluations. The zero-velocity baseline is the same
  reduction with v_theta = 0 on the same (x0, t, eps): mean((eps - x0)^2), about 1 + E[x0^2] = 2
  for standardised latents.
- Losses are reduced in float32 whatever the model's output dtype (bf16 under autocast).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from core.flow.schedules import noise_to
from core.flow.seeds import cpu_generator, derive_seed, gaussian_noise

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""velocity(x_t [B, C, h, w], t [B]) -> v [B, C, h, w] (any float dtype)."""


def logit_normal(n: int, seed: int, *, m: float = 0.0, s: float = 1.0) -> torch.Tensor:
    """n flow times t = sigmoid(m + s N(0, 1)) in (0, 1): float32 [n] on the CPU, keyed by `seed`."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if s <= 0:
        raise ValueError(f"s must be > 0, got {s}")
    z = torch.randn(n, generator=cpu_generator(seed), dtype=torch.float32)
    return torch.sigmoid(m + s * z)


@dataclass(frozen=True)
class FlowDraws:
    """One batch's random inputs: times t [B] and noise eps [B, C, h, w], float32 on the CPU."""

    t: torch.Tensor
    eps: torch.Tensor


def draw_flow_inputs(shape: tuple[int, ...] | torch.Size, seed: int) -> FlowDraws:
    """Logit-normal(0, 1) times and standard normal noise for a batch of `shape`, keyed by `seed`."""
    return FlowDraws(
        t=logit_normal(shape[0], derive_seed(seed, "t")), eps=gaussian_noise(shape, derive_seed(seed, "eps"))
    )


def _broadcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.to(device=x.device, dtype=torch.float32).view(-1, *([1] * (x.ndim - 1)))


def per_sample_flow_loss(
    velocity: VelocityFn, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
) -> torch.Tensor:
    """mean over (C, h, w) of (v_theta(x_t, t) - (eps - x0))^2: float32 [B]."""
    x0, eps = x0.float(), eps.float()
    x_t = noise_to(x0, eps, _broadcast(t, x0))
    v = velocity(x_t, t.to(x0.device))
    return (v.float() - (eps - x0)).square().flatten(1).mean(1)


def rectified_flow_loss(
    velocity: VelocityFn, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
) -> torch.Tensor:
    """The training loss: mean over every element of (v_theta(x_t, t) - (eps - x0))^2, float32 scalar."""
    return per_sample_flow_loss(velocity, x0, t, eps).mean()


@dataclass(frozen=True)
class ValidationSet:
    """Fixed validation inputs: clean latents x0 [N, C, h, w] with their own t [N] and eps (float32)."""

    x0: torch.Tensor
    t: torch.Tensor
    eps: torch.Tensor


def make_validation_set(x0: torch.Tensor, seed: int) -> ValidationSet:
    """Attach one fixed (t, eps) per crop, drawn like a training batch, on x0's device."""
    draws = draw_flow_inputs(x0.shape, seed)
    return ValidationSet(x0.float(), draws.t.to(x0.device), draws.eps.to(x0.device))


def validation_loss(velocity: VelocityFn, vs: ValidationSet, *, batch_size: int) -> torch.Tensor:
    """Mean flow loss over the whole set (float32 0-d tensor on the set's device), in batches of
    batch_size; crops are equal-sized, so the mean of per-crop means is the mean over every element."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    total = torch.zeros((), device=vs.x0.device, dtype=torch.float32)
    for start in range(0, vs.x0.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        total = total + per_sample_flow_loss(velocity, vs.x0[rows], vs.t[rows], vs.eps[rows]).sum()
    return total / vs.x0.shape[0]


def zero_velocity_loss(vs: ValidationSet, *, batch_size: int) -> torch.Tensor:
    """The baseline of predicting v = 0 on exactly the validation inputs: mean((eps - x0)^2)."""
    return validation_loss(lambda x, t: torch.zeros_like(x), vs, batch_size=batch_size)
