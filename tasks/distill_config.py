"""Configuration of the distillation job (tasks/distill.py): what the teacher samples, what is
captured, how each layer's student trains, when a layer is ready, the replay store's budgets.

The training parts (StudentConfig, TrainerConfig, DistillLossConfig, ReadinessConfig) are the
components' own configs, reused here; docs/distill.md explains each knob.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from core.attention.config import StudentConfig
from core.distill.capture import CAPTURE_DTYPES
from core.distill.loss import DistillLossConfig
from core.distill.plan import QUERY_MODES, DistillPlan, PlanConfig, default_group_count
from core.distill.readiness import ReadinessConfig
from core.distill.trainer import TrainerConfig
from core.models.attention_hook import LayerSet
from core.models.loading import ModelSpec

SIZE_MULTIPLE = 16


@dataclass(frozen=True, kw_only=True)
class TeacherConfig:
    """The teacher's sampling runs: generation from noise, run r over the list of prompts x seeds x
    sizes (cycled, with the seed derived per cycle so no run repeats; core/distill/plan.py).

    prompts: Flux prompts ("" for the reference model's learned conditioning); one per run cycle.
    seeds, sizes: start seeds and square image sizes in pixels (multiples of 16).
    steps: Euler steps per run. runs: how many teacher runs the job makes.
    """

    prompts: tuple[str, ...] = ("",)
    seeds: tuple[int, ...] = (0,)
    sizes: tuple[int, ...] = (256,)
    steps: int = 8
    runs: int = 12

    def __post_init__(self) -> None:
        if not self.prompts or not self.seeds or not self.sizes:
            raise ValueError(
                f"teacher.prompts, seeds and sizes must each list at least one value, got "
                f"{list(self.prompts)}, {list(self.seeds)}, {list(self.sizes)}"
            )
        if any(s < SIZE_MULTIPLE or s % SIZE_MULTIPLE for s in self.sizes):
            raise ValueError(f"teacher.sizes must be multiples of {SIZE_MULTIPLE} px, got {list(self.sizes)}")
        if self.steps < 1:
            raise ValueError(f"teacher.steps must be >= 1, got {self.steps}")
        if self.runs < 1:
            raise ValueError(f"teacher.runs must be >= 1, got {self.runs}")


@dataclass(frozen=True, kw_only=True)
class CaptureConfig:
    """Which attention calls become captures.

    swap_min, swap_max: per step, n ~ U{min, max} of the run's layer group are captured (-1 = all).
    query_cap: queries kept per capture (with every key and value); query_mode: even (evenly spaced
      over the whole sequence, text included) or random (seeded). dtype: the captures' dtype.
    validation_fraction: share of each layer's captures held out for readiness (never trained on).
    staging_mib: host memory for captures on their way into the store (written beside the sampling;
      when full, the sampling waits, recorded as capture_stall_s). A step's captures should fit:
      Flux at 2048² is about 200 MiB per capture.
    """

    swap_min: int = 1
    swap_max: int = -1
    query_cap: int = 128
    query_mode: str = "even"  # QUERY_MODES
    dtype: str = "bfloat16"  # core.distill.capture.CAPTURE_DTYPES
    validation_fraction: float = 0.25
    staging_mib: int = 4096

    @property
    def staging_bytes(self) -> int:
        return self.staging_mib << 20

    def __post_init__(self) -> None:
        if self.staging_mib < 1:
            raise ValueError(f"capture.staging_mib must be >= 1, got {self.staging_mib}")
        if self.swap_min < 1 and self.swap_min != -1:
            raise ValueError(f"capture.swap_min must be >= 1 or -1 (all), got {self.swap_min}")
        if self.swap_max != -1 and (
            self.swap_max < 1 or self.swap_min == -1 or self.swap_max < self.swap_min
        ):
            raise ValueError(
                f"capture.swap_max must be -1 (all) or >= swap_min ({self.swap_min}), got {self.swap_max}"
            )
        if self.query_cap < 1:
            raise ValueError(f"capture.query_cap must be >= 1, got {self.query_cap}")
        if self.query_mode not in QUERY_MODES:
            raise ValueError(f"capture.query_mode must be one of {QUERY_MODES}, got {self.query_mode!r}")
        if self.dtype not in CAPTURE_DTYPES:
            raise ValueError(f"capture.dtype must be one of {list(CAPTURE_DTYPES)}, got {self.dtype!r}")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"capture.validation_fraction must be in (0, 1), got {self.validation_fraction}")


@dataclass(frozen=True, kw_only=True)
class StudentOptions:
    """The StudentConfig of every layer, less heads and head_dim (read from the layer)."""

    features: int = 128
    feature_depth: int = 2
    landmark_fraction: float = 0.08
    landmark_min: int = 64
    landmark_max: int = 512
    local_tile: int = 8
    local_radius: int = 1
    alpha_max: float = 0.5
    alpha_init: float = 0.1

    def __post_init__(self) -> None:
        self.for_layer(1, 1)  # StudentConfig validates every field, naming it

    def for_layer(self, heads: int, head_dim: int) -> StudentConfig:
        return StudentConfig(heads=heads, head_dim=head_dim, **self.__dict__)


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    """updates: the optimizer updates each layer may take in the job (the budget);
    updates_per_capture: updates a layer takes per training capture its run added (capped by the
      budget left); validation_captures: held-out captures each layer is evaluated on after its run.
    """

    updates: int = 200
    updates_per_capture: int = 2
    validation_captures: int = 4
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    loss: DistillLossConfig = field(default_factory=DistillLossConfig)
    readiness: ReadinessConfig = field(default_factory=ReadinessConfig)

    def __post_init__(self) -> None:
        if self.updates < 1:
            raise ValueError(f"training.updates must be >= 1, got {self.updates}")
        if self.updates_per_capture < 1:
            raise ValueError(f"training.updates_per_capture must be >= 1, got {self.updates_per_capture}")
        if self.validation_captures < 1:
            raise ValueError(f"training.validation_captures must be >= 1, got {self.validation_captures}")


@dataclass(frozen=True, kw_only=True)
class ReplayBudgets:
    """The node stores' budgets in MiB (RAM tier on a tmpfs, disk tier in the output folder unless
    disk_dir names another) and the RAM tier's root (a tmpfs)."""

    ram_mib: int = 256
    disk_mib: int = 1024
    ram_dir: str = "/dev/shm/tessera-replay"
    disk_dir: str = ""

    def __post_init__(self) -> None:
        if self.ram_mib < 0 or self.disk_mib < 0 or self.ram_mib + self.disk_mib == 0:
            raise ValueError(
                f"replay.ram_mib and disk_mib must be >= 0, one > 0; got {self.ram_mib}, {self.disk_mib}"
            )


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """Distil the attention layers of `model` into per-layer students (docs/distill.md).

    layers: the layers to distil (LayerSet syntax: all, double, single, single:0-9, ...).
    layer_groups: G contiguous groups of those layers; run r captures group r mod G, which the
      worker g mod W owns (0 = min(#layers, 8)). G, not the worker count, decides the result.
    checkpoint_every: teacher runs between checkpoints (students, optimizers, replay state).
    log_every: updates between progress lines. seed: every draw of the job is keyed by it.
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    layers: str = "all"
    layer_groups: int = 0
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    student: StudentOptions = field(default_factory=StudentOptions)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    replay: ReplayBudgets = field(default_factory=ReplayBudgets)
    checkpoint_every: int = 2
    log_every: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        try:
            LayerSet.parse(self.layers)
        except ValueError as err:
            raise ValueError(f"layers: {err}") from None
        if self.model.kind == "reference" and self.teacher.prompts != ("",):
            raise ValueError(
                "teacher.prompts must be [''] for the reference model (it has learned conditioning), "
                f"got {list(self.teacher.prompts)}"
            )
        if self.layer_groups < 0:
            raise ValueError(f"layer_groups must be >= 0 (0 = min(#layers, 8)), got {self.layer_groups}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")

    def plan(self, model_layers: Sequence[str]) -> DistillPlan:
        """The job's plan over the selected layers of a model with `model_layers` (core/distill/plan.py):
        a pure function of the config, the same on the driver and on every worker."""
        chosen = LayerSet.parse(self.layers).select(list(model_layers))
        if not chosen:
            raise ValueError(
                f"layers {self.layers!r} selects none of the model's layers {list(model_layers)}"
            )
        groups = self.layer_groups or default_group_count(len(chosen))
        if groups > len(chosen):
            raise ValueError(
                f"layer_groups={groups} exceeds the {len(chosen)} layers selected by {self.layers!r}"
            )
        c = self.capture
        plan_cfg = PlanConfig(
            seed=self.seed, groups=groups, min_swap=c.swap_min, max_swap=c.swap_max,
            query_cap=c.query_cap, query_mode=c.query_mode,  # type: ignore[arg-type]
        )  # fmt: skip
        t = self.teacher
        return DistillPlan(
            chosen, plan_cfg, prompts=len(t.prompts), seeds=t.seeds, resolutions=[(s, s) for s in t.sizes]
        )
