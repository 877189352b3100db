"""Baselines for REINFORCE advantages: RLOO over the K rollouts of a prompt, and an EMA with a floor.

- RLOO (Kool, van Hoof and Welling 2019, "Buy 4 REINFORCE samples, get a baseline for free"): each of
  K rollouts of one prompt and seed is baselined by the mean reward of the other K - 1, so
  A_k = R_k - mean_{j != k} R_j = K / (K - 1) (R_k - mean R). The baseline does not depend on the
  rollout's own action, so the estimator stays unbiased; the advantages of a group sum to zero.
- EMA with a floor (the Flux2TTR controller's, kept as an ablation): b <- d b + (1 - d) max(R, floor),
  the first reward sets b, and each advantage uses the baseline from before its reward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


def rloo_advantages(rewards: Sequence[float]) -> list[float]:
    """A_k = R_k - mean of the other rewards of the group (K >= 2)."""
    k = len(rewards)
    if k < 2:
        raise ValueError(f"RLOO needs at least 2 rollouts per group, got {k}")
    total = sum(rewards)
    return [r - (total - r) / (k - 1) for r in rewards]


@dataclass
class EmaBaseline:
    decay: float = 0.95
    floor: float = -0.3
    value: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"EMA baseline decay must be in [0, 1), got {self.decay}")

    def advantages(self, rewards: Sequence[float]) -> list[float]:
        """R - b for each reward in order, updating b after each (the old b is the baseline)."""
        out = []
        for r in rewards:
            if self.value is None:
                self.value = max(r, self.floor)
            out.append(r - self.value)
            self.value = self.decay * self.value + (1 - self.decay) * max(r, self.floor)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "floor": self.floor, "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["decay"], state["floor"]) != (self.decay, self.floor):
            raise ValueError(
                f"EMA baseline state has decay/floor {state['decay']}/{state['floor']}, "
                f"this run {self.decay}/{self.floor}"
            )
        self.value = None if state["value"] is None else float(state["value"])
