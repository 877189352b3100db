"""Routing with a trained policy in a job: a threshold or a tempered draw, one decision per step.

quality_speed q in [0, 1] sets the threshold tau = 0.1 + 0.8 q on p(full attention): q = 0 keeps
full attention wherever p > 0.1 (quality), q = 1 only where p > 0.9 (speed).

- `threshold`: a layer keeps full attention iff sigmoid(l) > tau.
- `stochastic`: p' = sigmoid((l - logit tau) / T), and full ~ Bernoulli(p'), drawn from a CPU
  generator keyed by (seed, step), so every worker that serves a step draws the same mask.

Only layers whose student is ready can be routed. Inference uses the policy's own sigmoid without the
training's exploration floor. Decisions are cached by (step, sigma, cfg, grid): the tiles and
batches of one step share one decision, and each step's decision is kept once in `decisions`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from core.control.policy import PolicyInput, RoutingPolicy
from core.flow.seeds import cpu_generator, derive_seed

InferenceMode = Literal["threshold", "stochastic"]
INFERENCE_MODES: tuple[str, ...] = ("threshold", "stochastic")


def quality_speed_threshold(quality_speed: float) -> float:
    """tau = 0.1 + 0.8 q."""
    if not 0.0 <= quality_speed <= 1.0:
        raise ValueError(f"quality_speed must be in [0, 1], got {quality_speed}")
    return 0.1 + 0.8 * quality_speed


@dataclass(frozen=True)
class RoutingDecision:
    """One step's routing: the layers that serve their student."""

    step: int | None
    sigma: float
    threshold: float
    student_layers: tuple[str, ...]

    def as_record(self) -> dict:
        return {
            "step": self.step,
            "sigma": round(self.sigma, 6),
            "threshold": round(self.threshold, 6),
            "student_layers": list(self.student_layers),
        }


class InferenceRouter:
    """decide(state, step) -> RoutingDecision for a trained policy and the ready layers."""

    def __init__(
        self,
        policy: RoutingPolicy,
        ready: frozenset[str],
        *,
        mode: InferenceMode,
        quality_speed: float,
        temperature: float = 1.0,
        seed: int = 0,
    ) -> None:
        if mode not in INFERENCE_MODES:
            raise ValueError(f"controller policy must be one of {INFERENCE_MODES}, got {mode!r}")
        if temperature <= 0:
            raise ValueError(f"controller temperature must be > 0, got {temperature}")
        self.policy = policy.eval()
        self.ready = ready
        self.mode = mode
        self.threshold = quality_speed_threshold(quality_speed)
        self.temperature = temperature
        self.seed = seed
        self._cache: dict[tuple, RoutingDecision] = {}
        self.decisions: list[RoutingDecision] = []

    @torch.no_grad()
    def decide(self, state: PolicyInput, step: int | None) -> RoutingDecision:
        key = (step, state.sigma, state.cfg, state.rows, state.cols)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        logits = self.policy.logits([state])[0]
        if self.mode == "threshold":
            full = torch.sigmoid(logits) > self.threshold
        else:
            tau = self.threshold
            p = torch.sigmoid((logits - math.log(tau / (1 - tau))) / self.temperature)
            gen = cpu_generator(derive_seed(self.seed, "controller", -1 if step is None else step))
            full = torch.rand(tuple(p.shape), generator=gen) < p
        layers = tuple(
            k for k, f in zip(self.policy.layers, full.tolist(), strict=True) if not f and k in self.ready
        )
        decision = RoutingDecision(step, state.sigma, self.threshold, layers)
        self._cache[key] = decision
        self.decisions.append(decision)
        return decision
