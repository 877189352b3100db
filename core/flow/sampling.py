"""Samplers: plain functions of a model callable (in the style of k-diffusion).

`model_fn(x, sigma, step) -> v` returns the flow-matching velocity for the whole latent. Tiling,
global paths, skip residuals and pinning are composed around the model callable or passed as the
`after_step` hook; the sampler never knows about tiles, workers or Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from core.flow.schedules import euler_step

ModelFn = Callable[[torch.Tensor, float, int], torch.Tensor]


@dataclass(frozen=True)
class StepInfo:
    """What the observer sees after step `step` moved x from sigma to sigma_next."""

    step: int
    steps: int
    sigma: float
    sigma_next: float
    x: torch.Tensor


AfterStep = Callable[[torch.Tensor, int], torch.Tensor]
"""after_step(x_next, step) -> x_next: applied after the Euler update of `step` (x is at sigmas[step + 1])."""


def sample_euler(
    model_fn: ModelFn,
    x: torch.Tensor,
    sigmas: Sequence[float],
    *,
    after_step: AfterStep | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    first_step: int = 0,
) -> torch.Tensor:
    """Euler integration of dx/dsigma = v from sigmas[0] down to sigmas[-1].

    `first_step` offsets the step index passed to model_fn and the hooks, so a resumed run (or a
    rewind range) sees the same step numbers as an uninterrupted one.
    """
    steps = len(sigmas) - 1
    for i in range(steps):
        k = first_step + i
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        v = model_fn(x, sigma, k)
        x = euler_step(x, v.to(x.dtype), sigma, sigma_next)
        if after_step is not None:
            x = after_step(x, k)
        if callback is not None:
            callback(StepInfo(k, first_step + steps, sigma, sigma_next, x))
    return x
