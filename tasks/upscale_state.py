"""What an upscale job keeps across a restart: a typed state (core.state.Stateful, docs/state.md).

The state is the latent after the last finished phase, which phase comes next, how many views
each finished phase ran (so a resumed job's record is whole), and the fingerprint of the settings
that produced it. A resumed job plans its phases from the config again, loads this state and goes
on from `next_phase`: the plan is a pure function of the config and the inputs, so it continues
exactly where an uninterrupted run would be.

The fingerprint covers the whole config except `outputs` (artifacts never change the numbers). The
input image's bytes, the model's weights and the code are covered by the runner, which stamps every
checkpoint with the job's whole fingerprint and sets aside one of a job that differed before the
task sees it (docs/reliability.md).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from tasks.context import Artifacts
from tasks.upscale_config import UpscaleConfig

CHECKPOINT = "checkpoints/phase.pt"


def config_fingerprint(cfg: UpscaleConfig) -> str:
    """A short hash of everything in the config that changes the result."""
    settings = {k: v for k, v in asdict(cfg).items() if k != "outputs"}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class UpscaleState:
    """The job's progress at a phase boundary: phases [0, next_phase) are done and `latent` is the
    last one's result (None before the first)."""

    fingerprint: str
    next_phase: int = 0
    latent: torch.Tensor | None = None
    views_per_step: dict[str, list[int]] = field(default_factory=dict)

    def finish_phase(self, label: str, latent: torch.Tensor, views_per_step: list[int]) -> None:
        self.next_phase += 1
        self.latent = latent
        self.views_per_step[label] = list(views_per_step)

    def state_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "next_phase": self.next_phase,
            "latent": self.latent,
            "views_per_step": {k: list(v) for k, v in self.views_per_step.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = {"fingerprint", "next_phase", "latent", "views_per_step"} - set(state)
        if missing:
            raise ValueError(f"upscale state lacks {sorted(missing)}")
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(
                f"upscale state has config fingerprint {state['fingerprint']}, this job {self.fingerprint}"
            )
        self.next_phase = int(state["next_phase"])
        self.latent = state["latent"]
        self.views_per_step = {k: [int(n) for n in v] for k, v in state["views_per_step"].items()}


def resume(ctx: Artifacts, cfg: UpscaleConfig, phases: int) -> UpscaleState:
    """The saved state of this job if there is one from the same settings, else a fresh one.

    A checkpoint of other settings (another fingerprint) is not used; that is recorded as a fallback.
    """
    state = UpscaleState(config_fingerprint(cfg))
    saved = ctx.load_state(CHECKPOINT)
    if saved is None:
        return state
    if saved.get("fingerprint") != state.fingerprint:
        ctx.record_fallback(
            "resume", f"{CHECKPOINT} is from other settings ({saved.get('fingerprint')}); starting at phase 1"
        )
        return state
    state.load_state_dict(saved)
    if not 0 < state.next_phase <= phases:
        raise ValueError(f"{CHECKPOINT} says phase {state.next_phase} is next, but the plan has {phases}")
    ctx.record("resumed_from_phase", state.next_phase)
    return state
