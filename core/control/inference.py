"""Routing with a trained policy in a job: the most probable action or a tempered draw, one decision
per step, at the job's quality_speed.

quality_speed q in [0, 1] is an input of the policy (core/control/policy.py): training rewarded each
group for a routed share of q times the share of every ready layer, so q = 0 asks for quality (the
teacher), q = 1 for speed (every ready layer), and the policy knows which layers to give up in between.

- `threshold`: a layer keeps full attention iff sigmoid(l) >= 1/2, the policy's most probable action
  (a tie keeps the teacher: fail closed).
- `stochastic`: p' = sigmoid(l / T), and full ~ Bernoulli(p'), drawn from a CPU generator keyed by
  (seed, step), so every worker that serves a step draws the same mask.

(An earlier design fed no q to the policy and moved a threshold tau = 0.1 + 0.8 q on p instead. A
policy trained for one trade-off ends with its probabilities at the exploration floor, 0.02 / 0.98, so
every tau in [0.1, 0.9] picked the same layers: the frontier collapsed to one point.)

Only layers whose student is ready can be routed. Inference uses the policy's own sigmoid without the
training's exploration floor. Decisions are cached by (step, sigma, cfg, grid, q): the tiles and
batches of one step share one decision, and each step's decision is kept once in `decisions`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from core.control.policy import PolicyInput, RoutingPolicy
from core.flow.seeds import cpu_generator, derive_seed

InferenceMode = Literal["threshold", "stochastic"]
INFERENCE_MODES: tuple[str, ...] = ("threshold", "stochastic")


def check_quality_speed(quality_speed: float) -> float:
    """q itself, refused outside [0, 1]."""
    if not 0.0 <= quality_speed <= 1.0:
        raise ValueError(f"quality_speed must be in [0, 1], got {quality_speed}")
    return quality_speed


@dataclass(frozen=True)
class RoutingDecision:
    """One step's routing: the layers that serve their student."""

    step: int | None
    sigma: float
    quality_speed: float
    student_layers: tuple[str, ...]

    def as_record(self) -> dict:
        return {
            "step": self.step,
            "sigma": round(self.sigma, 6),
            "quality_speed": round(self.quality_speed, 6),
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
        self.quality_speed = check_quality_speed(quality_speed)
        self.temperature = temperature
        self.seed = seed
        self._cache: dict[tuple, RoutingDecision] = {}
        self.decisions: list[RoutingDecision] = []

    def state(self, sigma: float, cfg: float, rows: int, cols: int) -> PolicyInput:
        """The policy input of a call at this router's quality_speed."""
        return PolicyInput(sigma=sigma, cfg=cfg, rows=rows, cols=cols, quality_speed=self.quality_speed)

    @torch.no_grad()
    def decide(self, state: PolicyInput, step: int | None) -> RoutingDecision:
        if state.quality_speed != self.quality_speed:
            raise ValueError(
                f"a decision at quality_speed {state.quality_speed} from a router at {self.quality_speed}"
            )
        key = (step, state.sigma, state.cfg, state.rows, state.cols)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        logits = self.policy.logits([state])[0]
        if self.mode == "threshold":
            full = logits >= 0  # sigmoid(l) >= 1/2
        else:
            p = torch.sigmoid(logits / self.temperature)
            gen = cpu_generator(derive_seed(self.seed, "controller", -1 if step is None else step))
            full = torch.rand(tuple(p.shape), generator=gen) < p
        layers = tuple(
            k for k, f in zip(self.policy.layers, full.tolist(), strict=True) if not f and k in self.ready
        )
        decision = RoutingDecision(step, state.sigma, self.quality_speed, layers)
        self._cache[key] = decision
        self.decisions.append(decision)
        return decision
