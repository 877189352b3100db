"""Serving a trained controller in generation and upscale jobs: one routing decision per step.

`load_controller(path)` reads the file `task: controller` writes (tasks/controller.py) and rebuilds
the policy. `ControlledStudents` has the interface of runner.distill.serving.ServedStudents
(`routed(transformer)`, `take_counters()`), so the pool workers serve it the same way; its route is
a `MaskRoute` (core/control/mask_route.py) whose decision for a call comes from an
`InferenceRouter` at (sigma, cfg, grid) of the call, cached per step: the tiles and batches of a step
share it, and `take_decisions()` hands each step's decision over once for the log and job.json.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from core.attention.counters import RouteCounters
from core.attention.student import Student
from core.control.inference import InferenceRouter, RoutingDecision
from core.control.mask_route import MaskRoute
from core.control.policy import PolicyConfig, PolicyInput, RoutingPolicy, build_policy
from core.models.attention_hook import AttentionRecord, LayerSet, attach
from tasks.controller import CONTROLLER_FORMAT, CONTROLLER_VERSION
from tasks.controller_attention import ControllerAttention


@dataclass(frozen=True)
class TrainedController:
    policy: RoutingPolicy
    eligible: tuple[str, ...]
    students: str
    updates: int


def load_controller(path: str | Path) -> TrainedController:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"attention.controller {str(path)!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CONTROLLER_FORMAT:
        raise ValueError(f"attention.controller {str(path)!r} is not a controller file ({CONTROLLER_FORMAT})")
    if state.get("version") != CONTROLLER_VERSION:
        raise ValueError(
            f"controller {str(path)!r} has version {state.get('version')}, expected {CONTROLLER_VERSION}"
            + (
                " (version 1 policies do not see quality_speed: train the controller again)"
                if state.get("version") == 1
                else ""
            )
        )
    record = dict(state["policy_config"])
    policy = build_policy(PolicyConfig(**{**record, "layers": tuple(record["layers"])}), seed=0)
    policy.load_state_dict(state["policy"])
    return TrainedController(
        policy.eval(), tuple(state["eligible"]), str(state["students"]), int(state["updates"])
    )


def call_state(record: AttentionRecord, router: InferenceRouter) -> PolicyInput:
    """The policy's input for an attention call: the one convention (sigma, cfg, tokens per axis), at
    the router's quality_speed."""
    sigma = record.sigma
    if not torch.all(sigma == sigma[0]):
        raise ValueError(
            f"a routed batch mixes sigmas {sigma.tolist()}: one routing decision needs one sigma"
        )
    cfg = 1.0 if record.cfg is None else float(record.cfg)
    return router.state(float(sigma[0]), cfg, record.rows, record.cols)


class ControlledStudents:
    def __init__(
        self, students: Mapping[str, Student], controller: TrainedController, cfg: ControllerAttention
    ) -> None:
        unknown = sorted(set(students) - set(controller.policy.layers))
        if unknown:
            raise ValueError(f"students for layers {unknown} that the controller has no logit for")
        self.layers = tuple(k for k in controller.policy.layers if k in students)
        self.router = InferenceRouter(
            controller.policy,
            frozenset(self.layers),
            mode=cfg.policy,
            quality_speed=cfg.quality_speed,
            temperature=cfg.temperature,
            seed=cfg.seed,
        )
        self.route = MaskRoute(students, self._decide, ready=self.layers)
        self._taken = 0

    def _decide(self, record: AttentionRecord) -> frozenset[str]:
        return frozenset(self.router.decide(call_state(record, self.router), record.step).student_layers)

    @contextlib.contextmanager
    def routed(self, transformer: nn.Module) -> Iterator[None]:
        if not self.layers:
            yield
            return
        with attach(transformer, self.route, LayerSet.parse(",".join(self.layers))):
            yield

    def take_counters(self) -> RouteCounters:
        taken = self.route.counters
        self.route.counters = self.route.students.counters = RouteCounters()
        return taken

    def take_decisions(self) -> list[RoutingDecision]:
        """The decisions made since the last call (each step's once)."""
        new = self.router.decisions[self._taken :]
        self._taken = len(self.router.decisions)
        return new
