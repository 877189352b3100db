"""The central learner: policy, optimizer, baseline and step, updated from groups of rollouts.

One update takes G groups (one prompt and seed each) of K rollouts and minimises

    loss = -1/(G K) sum_r A_r sum_s w_s sum_{l eligible} log pi(full_{s,l} | state_s)
           - lambda_ent H(policy at the recorded states)
           + c_bound mean_{eligible} max(0, |logit| - L)^2,     L = log((1 - eps) / eps)

with log pi recomputed through the live policy from each rollout's recorded (sigma, mask,
eligibility) and the same `PolicyInput`s the worker sampled with (core/control/policy.py), A_r the
RLOO advantage within its group (or the EMA baseline's, an ablation), w_s the step weights and H the
mean Bernoulli entropy over eligible layers (the A3C-style entropy bonus, Mnih et al. 2016; it is in
the reward too, where under RLOO it cancels: the K rollouts of a group see the same states). AdamW,
gradients clipped by global norm.

The logit bound. The exploration floor eps keeps p(full) in [eps, 1 - eps] (core/control/masks.py),
but not the logits: once sigmoid(l) is within eps of 0 or 1 the policy's behaviour no longer changes
while its log pi gradient, proportional to sigmoid(l) (1 - sigmoid(l)), decays as e^-|l|. Logits then
run away, and a layer stuck at the floor cannot come back however good the rollouts that explore it
are: the controller trained for the one target of its reward ended with every probability at the
floor (bench/results/controller.json before this term), and a policy conditioned on quality_speed
lost whole frontier points to it on a toy bandit (tests/test_control.py). The squared hinge beyond
L = logit(1 - eps), where sigmoid reaches the floor, holds the logits where the gradient lives and
changes no behaviour the floor allows.

Rollouts are sorted by (group, index) before the loss is summed, so an update does not depend on
which worker returned which rollout first: one worker and two give the same update.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from core.control.baselines import EmaBaseline, rloo_advantages
from core.control.masks import full_probability, log_prob, mean_entropy, step_weights
from core.control.policy import PolicyConfig, RoutingPolicy, build_policy, policy_features
from core.control.rollout import Rollout

Baseline = Literal["rloo", "ema"]
BASELINES: tuple[str, ...] = ("rloo", "ema")
LEARNER_FORMAT = 1
# c_bound. On the frontier bandit of tests/test_control.py at lr 1e-2, without the term the policy fell
# within 80 updates into one q-independent mask at the floor and stayed; with 0.1 it kept learning.
# 1.0 held the logits as well but slowed learning (a standing tug of war at the bound inflates Adam's
# second moments for every parameter).
LOGIT_BOUND_WEIGHT = 0.1


@dataclass(frozen=True, kw_only=True)
class LearnerConfig:
    lr: float = 3e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    baseline: Baseline = "rloo"
    ema_decay: float = 0.95  # the EMA baseline (ablation)
    ema_floor: float = -0.3
    entropy_weight: float = 0.01  # lambda_ent, in the loss and in the reward
    prob_floor: float = 0.02  # p(full) and p(student) kept >= this (core/control/masks.py)

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.grad_clip <= 0 or self.weight_decay < 0 or self.entropy_weight < 0:
            raise ValueError(
                f"learner needs lr > 0, grad_clip > 0, weight_decay >= 0, entropy_weight >= 0, got "
                f"{self.lr}, {self.grad_clip}, {self.weight_decay}, {self.entropy_weight}"
            )
        if self.baseline not in BASELINES:
            raise ValueError(f"learner baseline must be one of {BASELINES}, got {self.baseline!r}")
        if not 0.0 <= self.prob_floor < 0.5:
            raise ValueError(f"learner prob_floor must be in [0, 0.5), got {self.prob_floor}")


@dataclass(frozen=True)
class UpdateStats:
    step: int
    loss: float
    reward_mean: float
    reward_max: float
    advantage_abs_mean: float
    entropy: float
    p_full_mean: float  # mean p(full) over eligible (step, layer) entries before the update
    share_mean: float
    quality_mean: float
    grad_norm: float
    logit_abs_max: float  # over eligible entries before the update (the bound is logit(1 - floor))

    def as_metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items() if k != "step"}


def logit_bound_penalty(logits: torch.Tensor, eligible: torch.Tensor, floor: float) -> torch.Tensor:
    """mean over eligible entries of max(0, |l| - L)^2, L = log((1 - floor) / floor); 0 with floor 0."""
    if floor <= 0:
        return logits.new_zeros(())
    excess = (logits.abs() - math.log((1 - floor) / floor)).clamp(min=0) * eligible.to(logits.dtype)
    count = eligible.sum()
    return excess.square().sum() / count if count > 0 else excess.sum() * 0.0


class Learner:
    """Holds the policy and its optimizer; `update(rollouts)` is one REINFORCE step."""

    def __init__(self, policy_config: PolicyConfig, cfg: LearnerConfig, *, seed: int) -> None:
        self.cfg = cfg
        self.policy: RoutingPolicy = build_policy(policy_config, seed=seed)
        self.optimizer = torch.optim.AdamW(
            self.policy.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
        )
        self.baseline = EmaBaseline(cfg.ema_decay, cfg.ema_floor)
        self.step = 0

    def advantages(self, rollouts: Sequence[Rollout]) -> list[float]:
        """Per rollout (in the given order, which must be sorted): RLOO within groups, or EMA."""
        rewards = [r.reward.total for r in rollouts]
        if self.cfg.baseline == "ema":
            return self.baseline.advantages(rewards)
        adv = [0.0] * len(rollouts)
        for g in sorted({r.group for r in rollouts}):
            idx = [i for i, r in enumerate(rollouts) if r.group == g]
            for i, a in zip(idx, rloo_advantages([rewards[i] for i in idx]), strict=True):
                adv[i] = a
        return adv

    def _logits(self, rollout: Rollout) -> torch.Tensor:
        """[S, L] for the rollout's recorded states: one forward per rollout, the shape the worker
        sampled with, so the recompute is bit for bit the sampling-time computation."""
        return self.policy(policy_features(rollout.inputs(), self.policy.config))

    def log_probs(self, rollouts: Sequence[Rollout]) -> list[torch.Tensor]:
        """log pi per step [S] of each rollout under the live policy (differentiable)."""
        floor = self.cfg.prob_floor
        return [log_prob(self._logits(r), r.full(), r.eligible(), floor=floor) for r in rollouts]

    def update(self, rollouts: Sequence[Rollout]) -> UpdateStats:
        if not rollouts:
            raise ValueError("an update needs at least one rollout")
        rollouts = sorted(rollouts, key=lambda r: (r.group, r.index))
        keys = [(r.group, r.index) for r in rollouts]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate rollouts (group, index) in one update: {keys}")
        adv = self.advantages(rollouts)
        floor = self.cfg.prob_floor
        with torch.inference_mode(False), torch.enable_grad():
            logits = [self._logits(r) for r in rollouts]
            policy_term = logits[0].new_zeros(())
            for r, a, lg in zip(rollouts, adv, logits, strict=True):
                lp = log_prob(lg, r.full(), r.eligible(), floor=floor)
                policy_term = policy_term + a * (step_weights(r.sigmas()) * lp).sum()
            logits_all = torch.cat(logits)
            eligible_all = torch.cat([r.eligible() for r in rollouts])
            entropy = mean_entropy(logits_all, eligible_all, floor=floor)
            bound = logit_bound_penalty(logits_all, eligible_all, floor)
            loss = (
                -policy_term / len(rollouts) - self.cfg.entropy_weight * entropy + LOGIT_BOUND_WEIGHT * bound
            )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
        self.step += 1
        p = full_probability(logits_all.detach(), floor)
        n_elig = int(eligible_all.sum())
        rewards = [r.reward.total for r in rollouts]
        return UpdateStats(
            step=self.step,
            loss=float(loss.detach()),
            reward_mean=sum(rewards) / len(rewards),
            reward_max=max(rewards),
            advantage_abs_mean=sum(abs(a) for a in adv) / len(adv),
            entropy=float(entropy.detach()),
            p_full_mean=float((p * eligible_all).sum() / n_elig) if n_elig else 1.0,
            share_mean=sum(r.reward.share for r in rollouts) / len(rollouts),
            quality_mean=sum(r.reward.quality for r in rollouts) / len(rollouts),
            grad_norm=float(grad_norm),
            logit_abs_max=float(logits_all.detach()[eligible_all].abs().max()) if n_elig else 0.0,
        )

    def policy_state(self) -> dict[str, torch.Tensor]:
        """The weights the workers need (CPU tensors, cloned)."""
        return {k: v.detach().clone() for k, v in self.policy.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": LEARNER_FORMAT,
            "policy_config": self.policy.config.as_record(),
            "policy": self.policy_state(),
            "optimizer": self.optimizer.state_dict(),
            "baseline": self.baseline.state_dict(),
            "step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != LEARNER_FORMAT:
            raise ValueError(f"learner state format {state.get('format')!r}, expected {LEARNER_FORMAT}")
        if state["policy_config"] != self.policy.config.as_record():
            raise ValueError(
                f"learner state is for policy {state['policy_config']}, "
                f"this run has {self.policy.config.as_record()}"
            )
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.baseline.load_state_dict(state["baseline"])
        self.step = int(state["step"])
