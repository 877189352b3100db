"""Per-layer counters of a route: which attention calls the teacher and the students served, and why
a student did not. The runner writes `RouteCounters.as_record()` into job.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LayerCounters:
    """Counts for one layer ("double:i" / "single:i").

    calls: attention calls the route received for the layer.
    teacher: calls served by the teacher by design (teacher and capture routes).
    student: calls a student served.
    captures: calls handed to a capture callback.
    not_ready, no_student, mask, nonfinite: student-route fallbacks to the teacher, by cause
        (layer not marked ready; no student for the layer; an attention mask the student does not
        support; a NaN or Inf in a branch or the output).
    nonfinite_local, nonfinite_kernel, nonfinite_landmark, nonfinite_output: which parts held
        the non-finite values (a call may count in several).
    min_denominator: the smallest kernel-branch denominator seen (None before the first student call).
    small: calls the student route gave the teacher by design because their image tokens were below
        its `min_image_tokens` (the size under which the student is slower; not a fallback).
    """

    calls: int = 0
    teacher: int = 0
    student: int = 0
    captures: int = 0
    not_ready: int = 0
    no_student: int = 0
    mask: int = 0
    nonfinite: int = 0
    nonfinite_local: int = 0
    nonfinite_kernel: int = 0
    nonfinite_landmark: int = 0
    nonfinite_output: int = 0
    min_denominator: float | None = None
    small: int = 0

    @property
    def fallbacks(self) -> int:
        return self.not_ready + self.no_student + self.mask + self.nonfinite

    def note_nonfinite(self, parts: tuple[str, ...]) -> None:
        """A fallback for non-finite values in `parts` ("local", "kernel", "landmark", "output")."""
        self.nonfinite += 1
        self.nonfinite_local += "local" in parts
        self.nonfinite_kernel += "kernel" in parts
        self.nonfinite_landmark += "landmark" in parts
        self.nonfinite_output += "output" in parts

    def note_denominator(self, value: float) -> None:
        if self.min_denominator is None or value < self.min_denominator:
            self.min_denominator = value


@dataclass
class RouteCounters:
    """LayerCounters per layer key, created at a layer's first call."""

    layers: dict[str, LayerCounters] = field(default_factory=dict)

    def layer(self, key: str) -> LayerCounters:
        if key not in self.layers:
            self.layers[key] = LayerCounters()
        return self.layers[key]

    def total(self) -> LayerCounters:
        """Sums over layers (min_denominator: the minimum)."""
        out = LayerCounters()
        for c in self.layers.values():
            for name, value in asdict(c).items():
                if name == "min_denominator":
                    if value is not None:
                        out.note_denominator(value)
                else:
                    setattr(out, name, getattr(out, name) + value)
        return out

    def as_record(self) -> dict[str, Any]:
        """{"layers": {key: counts}, "total": counts}, JSON-ready, with each layer's fallback sum."""

        def counts(c: LayerCounters) -> dict[str, Any]:
            return {**asdict(c), "fallbacks": c.fallbacks}

        return {"layers": {k: counts(c) for k, c in self.layers.items()}, "total": counts(self.total())}
