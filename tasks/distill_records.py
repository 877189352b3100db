"""Typed records crossing the distillation job's boundaries: what a worker reports after a teacher
run (core.distill.plan.TeacherRun), a layer's shape, and a layer's snapshot for the students bundle."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from core.attention.config import StudentConfig


@dataclass(frozen=True)
class LayerReport:
    """One layer after one run: its last update's loss parts, the run's validation, readiness."""

    key: str
    group: int
    updates: int  # optimizer updates attempted so far (the budget's count)
    new_updates: int
    train_captures: int
    val_captures: int
    loss: float | None
    smooth_l1: float | None
    cosine_distance: float | None
    nmse: float | None
    gate: float | None
    mean_loss: float | None
    val_cosine_distance: float | None
    val_nmse: float | None
    ema_cosine_distance: float | None
    ready: bool
    may_serve: bool
    skipped: int  # updates skipped as non-finite
    ladder: list[dict[str, Any]]  # OOM ladder rungs taken (job.json)
    train_s: float


@dataclass(frozen=True)
class RunReport:
    """A finished teacher run: its layers' reports and states (trainer, readiness, ladder)."""

    run: int
    group: int
    worker: int
    layers: dict[str, LayerReport]
    states: dict[str, dict[str, Any]]
    captures: int
    capture_bytes: int
    sample_s: float
    train_s: float
    # the capture writer (runner/distill/capture_writer.py): the sampling waiting for room in its
    # bound, the sampling's end waiting for the last writes, and the writer thread's busy time
    capture_stall_s: float = 0.0
    capture_close_s: float = 0.0
    capture_write_s: float = 0.0


@dataclass(frozen=True)
class LayerInfo:
    """An attention layer of the model: its key and shape."""

    key: str
    heads: int
    head_dim: int


@dataclass(frozen=True)
class LayerSnapshot:
    """What the students bundle keeps of a layer (runner/distill/bundle.py writes it)."""

    key: str
    student: StudentConfig
    weights: dict[str, Any]  # the student's state_dict
    ready: bool
    may_serve: bool
    readiness: dict[str, Any]
    losses: dict[str, float | None]
    updates: int
    group: int
    worker: int
    extra: dict[str, Any] = field(default_factory=dict)
