"""The central learner actor: one per controller job, holding the policy, its optimizer and baseline.

Workers never talk to it: the driver sends it each update's rollouts and takes its weights (an
object reference that every worker resolves from Ray's object store, so the weights are sent once
per update however many workers there are)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ray
import torch

from core.control.learner import Learner, LearnerConfig, UpdateStats
from core.control.policy import PolicyConfig
from core.control.rollout import Rollout


class LearnerActor:
    def __init__(self, policy: PolicyConfig, cfg: LearnerConfig, seed: int) -> None:
        torch.set_num_threads(1)
        self.learner = Learner(policy, cfg, seed=seed)

    def update(self, rollouts: Sequence[Rollout]) -> UpdateStats:
        return self.learner.update(rollouts)

    def policy_state(self) -> dict[str, torch.Tensor]:
        return self.learner.policy_state()

    def state_dict(self) -> dict[str, Any]:
        return self.learner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.learner.load_state_dict(state)


class RemoteLearner:
    """tasks.controller_config.LearnerHandle over a LearnerActor."""

    def __init__(self, policy: PolicyConfig, cfg: LearnerConfig, *, seed: int) -> None:
        self.policy = policy
        self.actor = ray.remote(LearnerActor).options(num_cpus=0).remote(policy, cfg, seed)

    def update(self, rollouts: Sequence[Rollout]) -> UpdateStats:
        return ray.get(self.actor.update.remote(list(rollouts)))

    def weights(self) -> ray.ObjectRef:
        return self.actor.policy_state.remote()

    def state_dict(self) -> dict[str, Any]:
        return ray.get(self.actor.state_dict.remote())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ray.get(self.actor.load_state_dict.remote(state))

    def close(self) -> None:
        ray.kill(self.actor)
