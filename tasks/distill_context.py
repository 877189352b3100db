"""What the distillation task asks of the runner (runner/distill/job.py implements it)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from core.distill.plan import TeacherRun
from tasks.context import Artifacts
from tasks.distill_config import DistillConfig
from tasks.distill_records import LayerInfo, LayerSnapshot, RunReport


class DistillContext(Artifacts, Protocol):
    """workers: W, the pool's distillation workers (worker w owns the layer groups g with g mod W = w)."""

    workers: int

    def layers(self) -> list[LayerInfo]:
        """The model's attention layers in order ("double:i", then "single:i"), with their shapes."""
        ...

    def begin(
        self,
        cfg: DistillConfig,
        groups: Mapping[int, tuple[str, ...]],
        states: Mapping[str, Any],
        replay: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        """Start the replay store of every node (from `replay`, a checkpoint's, or empty) and each
        worker's session for its groups (layer states from `states`; missing = fresh). Returns the
        stores' state as begun (the restart point of the first chunk)."""
        ...

    def teacher_runs(
        self, runs: Sequence[TeacherRun], *, states: Mapping[str, Any], replay: Mapping[str, Any]
    ) -> list[RunReport]:
        """Run each teacher run on the worker owning its group (one run in flight per worker, the
        workers in parallel); the reports in run order. A lost worker is replaced, and the whole
        chunk runs again from `states` and `replay` (the last checkpoint), so the reports equal an
        undisturbed chunk's."""
        ...

    def replay_state(self) -> dict[str, Any]:
        """Every node store's state_dict() (no run in flight): the checkpoint's replay part."""
        ...

    def save_students(
        self,
        name: str,
        layers: Sequence[LayerSnapshot],
        *,
        hyperparameters: Mapping[str, Any],
        assignment: Mapping[str, Any],
        meta: Mapping[str, Any],
    ) -> str:
        """Write the students bundle folder `name` (safetensors per layer + manifest)."""
        ...

    def status(self, line: str) -> None:
        """One console line (the job's progress)."""
        ...
