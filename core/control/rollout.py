"""What a rollout records and how its masks are drawn: the part of REINFORCE that runs on a worker.

A rollout is one routed (student) trajectory of a prompt and seed. Before sampling, the worker draws
its masks for every step from the policy it was sent (`draw_rollout_masks`): the policy's state does
not depend on the latent, only on (sigma, cfg, grid, pooled text), so all steps' masks can be drawn
at once. The rollout then returns, per step, sigma, the mask and the eligibility, and its reward; the
learner rebuilds the same `PolicyInput`s (`Rollout.inputs`) to recompute log pi.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.control.masks import draw_masks, log_prob
from core.control.policy import PolicyInput, RoutingPolicy
from core.control.reward import QualityTerms, RewardParts


@dataclass(frozen=True)
class StepRecord:
    """One diffusion step of a rollout; full and eligible hold one flag per policy layer."""

    sigma: float
    full: tuple[bool, ...]
    eligible: tuple[bool, ...]


@dataclass(frozen=True)
class RolloutState:
    """What is fixed over a trajectory: guidance, latent token grid, the group's quality_speed, pooled
    text (or None)."""

    cfg: float
    rows: int
    cols: int
    quality_speed: float
    pooled: torch.Tensor | None = None

    def at(self, sigma: float) -> PolicyInput:
        return PolicyInput(
            sigma=sigma,
            cfg=self.cfg,
            rows=self.rows,
            cols=self.cols,
            quality_speed=self.quality_speed,
            pooled=self.pooled,
        )


@dataclass(frozen=True)
class Rollout:
    """group: the (prompt, seed) group of this update; index: k in 0..K-1 within it."""

    group: int
    index: int
    state: RolloutState
    steps: tuple[StepRecord, ...]
    quality: QualityTerms
    reward: RewardParts
    log_prob: float  # sum over steps of log pi at sampling time (for checks, not for the gradient)

    def inputs(self) -> list[PolicyInput]:
        return [self.state.at(s.sigma) for s in self.steps]

    def full(self) -> torch.Tensor:
        return torch.tensor([s.full for s in self.steps], dtype=torch.bool)

    def eligible(self) -> torch.Tensor:
        return torch.tensor([s.eligible for s in self.steps], dtype=torch.bool)

    def sigmas(self) -> torch.Tensor:
        return torch.tensor([s.sigma for s in self.steps], dtype=torch.float32)


@dataclass(frozen=True)
class MaskPlan:
    """The masks of one trajectory: full [S, L] and eligible [S, L] bool, log pi per step [S]."""

    sigmas: tuple[float, ...]
    full: torch.Tensor
    eligible: torch.Tensor
    log_prob: torch.Tensor

    def student_layers(self, step: int, layers: tuple[str, ...]) -> frozenset[str]:
        """The layers that serve their student at `step` (eligible and not full)."""
        row = ~self.full[step] & self.eligible[step]
        return frozenset(k for k, routed in zip(layers, row.tolist(), strict=True) if routed)

    def records(self) -> tuple[StepRecord, ...]:
        return tuple(
            StepRecord(s, tuple(f.tolist()), tuple(e.tolist()))
            for s, f, e in zip(self.sigmas, self.full, self.eligible, strict=True)
        )


def eligibility(layers: tuple[str, ...], ready: frozenset[str], steps: int) -> torch.Tensor:
    """[S, L] bool: a layer is eligible at every step iff its student is ready."""
    row = torch.tensor([k in ready for k in layers], dtype=torch.bool)
    return row.expand(steps, -1).clone()


@torch.no_grad()
def draw_rollout_masks(
    policy: RoutingPolicy,
    state: RolloutState,
    sigmas: list[float],
    ready: frozenset[str],
    *,
    seed: int,
    floor: float,
) -> MaskPlan:
    """Masks for the steps at `sigmas` (the sigma each step's model call sees), seeded by `seed`."""
    logits = policy.logits([state.at(s) for s in sigmas])
    eligible = eligibility(policy.layers, ready, len(sigmas))
    full = draw_masks(logits, eligible, seed=seed, floor=floor)
    lp = log_prob(logits, full, eligible, floor=floor)
    return MaskPlan(tuple(float(s) for s in sigmas), full, eligible, lp)
