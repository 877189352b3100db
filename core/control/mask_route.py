"""A route that serves, at each call, the student for the layers the step's mask routes, else the teacher.

`MaskRoute(students, decide)`: `decide(record) -> frozenset of layer keys` names the layers that
serve their student for this call (a rollout's mask for record.step, or an `InferenceRouter`'s
decision). Those layers go through a `StudentRoute` (core/attention/routes.py), so they still fail
closed (no student, not ready, a mask, a non-finite branch: the teacher serves and the cause is
counted); every other layer gets the teacher, counted as `teacher`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

from core.attention.routes import StudentRoute, teacher_attention
from core.attention.student import Student
from core.models.attention_hook import AttentionRecord

Decide = Callable[[AttentionRecord], frozenset[str]]


class MaskRoute:
    def __init__(self, students: Mapping[str, Student], decide: Decide, *, ready: Iterable[str] = ()) -> None:
        self.students = StudentRoute(students, ready=ready)
        self.decide = decide
        self.counters = self.students.counters  # one set of counters for both paths

    def __call__(self, record: AttentionRecord) -> torch.Tensor:
        if record.layer in self.decide(record):
            return self.students(record)
        c = self.counters.layer(record.layer)
        c.calls += 1
        c.teacher += 1
        return teacher_attention(record)
