"""`task: controller`: the job file's fields, and what the task asks of the runner.

task: controller
students: runs/distill/students   # a students bundle (task: distill); its servable layers are eligible
size: 128                          # image pixels per side of the rollouts (the cost is timed here)
steps: 4
workers: 2                         # rollout workers; the learner is one more actor
updates: 40
prompts_per_update: 2              # groups of K rollouts, one seed each
rollouts: 4                        # K
quality_speeds: [0, 0.25, 0.5, 0.75, 1]   # the frontier points trained on, one per group in turn
perceptual_weight: 0.0             # > 0: LPIPS(routed, teacher) in the reward; needs the AlexNet weights
lpips_backbone: ""                 # torchvision's alexnet-owt-7be5be79.pth; "" = the torch hub cache
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from core.control.episode import GroupTask
from core.control.learner import BASELINES, Baseline, LearnerConfig, UpdateStats
from core.control.policy import PolicyConfig
from core.control.reward import CostTable, RewardConfig
from core.control.rollout import Rollout
from core.models.loading import ModelSpec
from tasks.context import Artifacts


@dataclass(frozen=True, kw_only=True)
class ControllerConfig:
    """cost_table: "" = measure on the workers at start (recorded); or a JSON file of a table
    recorded by an earlier run (its job.json `records.cost_table`), so that runs compare on one cost."""

    model: ModelSpec = field(default_factory=ModelSpec)
    students: str = ""
    size: int = 128
    steps: int = 4
    workers: int = 2
    updates: int = 40
    prompts_per_update: int = 2
    rollouts: int = 4
    seed: int = 0
    hidden: int = 256
    lr: float = 3e-3
    baseline: Baseline = "rloo"
    entropy_weight: float = 0.01
    prob_floor: float = 0.02
    cost_weight: float = 1.0
    quality_speeds: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    rmse_weight: float = 1.0
    cosine_weight: float = 1.0
    perceptual_weight: float = 0.0
    lpips_backbone: str = ""
    cost_table: str = ""
    timing_repeats: int = 5
    checkpoint_every: int = 5
    image_every: int = 10
    log_every: int = 1

    def __post_init__(self) -> None:
        if not self.students:
            raise ValueError("students must name a students bundle folder (written by task: distill), got ''")
        if self.size < 16 or self.size % 16:
            raise ValueError(f"size must be a multiple of 16 pixels >= 16, got {self.size}")
        for name in ("steps", "workers", "updates", "prompts_per_update", "timing_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.rollouts < 2:
            raise ValueError(f"rollouts must be >= 2 (the RLOO baseline leaves one out), got {self.rollouts}")
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {self.baseline!r}")
        for name in ("checkpoint_every", "image_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        bad = [q for q in self.quality_speeds if not 0.0 <= q <= 1.0]
        if not self.quality_speeds or bad:
            raise ValueError(
                f"quality_speeds must be a non-empty list in [0, 1], got {list(self.quality_speeds)}"
            )
        self.learner()  # validates lr, entropy_weight, prob_floor
        self.reward()

    def learner(self) -> LearnerConfig:
        return LearnerConfig(
            lr=self.lr, baseline=self.baseline, entropy_weight=self.entropy_weight, prob_floor=self.prob_floor
        )

    def reward(self) -> RewardConfig:
        return RewardConfig(
            rmse_weight=self.rmse_weight,
            cosine_weight=self.cosine_weight,
            perceptual_weight=self.perceptual_weight,
            cost_weight=self.cost_weight,
        )

    def group_quality_speed(self, update: int, group: int) -> float:
        """The frontier point of group g of update u: the trained points in turn."""
        qs = self.quality_speeds
        return float(qs[(update * self.prompts_per_update + group) % len(qs)])


@dataclass(frozen=True)
class WorkerInfo:
    """What a rollout worker reports at start: the model's layers, the servable students, its table."""

    worker: int
    layers: tuple[str, ...]
    ready: tuple[str, ...]
    cost_table: CostTable
    device: str


@dataclass(frozen=True)
class GroupResult:
    """One group's rollouts, and (when asked) the teacher image and the first rollout's image."""

    task: GroupTask
    rollouts: tuple[Rollout, ...]
    teacher_image: Any = None
    student_image: Any = None
    worker: int = -1


class LearnerHandle(Protocol):
    """The central learner (one actor): policy, optimizer, baseline, step."""

    def update(self, rollouts: Sequence[Rollout]) -> UpdateStats: ...

    def weights(self) -> Any:
        """The current policy weights as the workers receive them (sent once, shared by all)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ControllerContext(Artifacts, Protocol):
    def start_workers(self, cfg: ControllerConfig) -> list[WorkerInfo]:
        """Start the rollout workers (model and students loaded, layer timings measured once)."""
        ...

    def start_learner(self, policy: PolicyConfig, cfg: LearnerConfig, *, seed: int) -> LearnerHandle: ...

    def run_groups(
        self, tasks: Sequence[GroupTask], weights: Any, cost: CostTable, *, images: bool
    ) -> list[GroupResult]:
        """Every group on some worker (whichever is free), results in task order."""
        ...

    def read_json(self, path: str) -> Any: ...
