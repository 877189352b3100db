"""Routes: what an attention call of a routed layer (core/models/attention_hook.py) computes.

- `TeacherRoute`: the layer's own softmax attention (SDPA in diffusers' native layout and call), so a
  teacher-routed layer gives bit for bit the plain model's output.
- `StudentRoute`: per-layer students, fail closed: the teacher serves whenever the layer has no
  student, is not marked ready, passes an attention mask, or any student branch is non-finite.
- `CaptureRoute`: the teacher, plus a callback that receives each record and the teacher's output
  (the hook point for a replay store: the callback decides what to keep, and copies it).

Every route counts per layer in a `RouteCounters` (core/attention/counters.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F

from core.attention.counters import RouteCounters
from core.attention.geometry import TokenGeometry
from core.attention.student import Student, StudentOutput
from core.models.attention_hook import AttentionRecord

CaptureCallback = Callable[[AttentionRecord, torch.Tensor], None]
"""(record, teacher output [B, S, H, D]) -> None. The tensors are the forward's live activations:
copy what must outlive the call (for example to pinned host memory)."""


def teacher_attention(record: AttentionRecord) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for the record, [B, S, H, D]: diffusers' native backend, same call.

    A 2-D key-padding mask [B, S] is reshaped to [B, 1, 1, S] as diffusers does before SDPA.
    """
    mask = record.mask
    if mask is not None and mask.ndim == 2 and mask.shape == (record.q.shape[0], record.k.shape[1]):
        mask = mask[:, None, None, :]
    q, k, v = (x.permute(0, 2, 1, 3) for x in (record.q, record.k, record.v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False, scale=None)
    return out.permute(0, 2, 1, 3)


class TeacherRoute:
    """Every call to the teacher."""

    def __init__(self) -> None:
        self.counters = RouteCounters()

    def __call__(self, record: AttentionRecord) -> torch.Tensor:
        c = self.counters.layer(record.layer)
        c.calls += 1
        c.teacher += 1
        return teacher_attention(record)


class CaptureRoute:
    """The teacher, and `callback(record, teacher_output)` on every call."""

    def __init__(self, callback: CaptureCallback) -> None:
        self.callback = callback
        self.counters = RouteCounters()

    def __call__(self, record: AttentionRecord) -> torch.Tensor:
        c = self.counters.layer(record.layer)
        c.calls += 1
        c.teacher += 1
        out = teacher_attention(record)
        self.callback(record, out)
        c.captures += 1
        return out


class StudentRoute:
    """Students by layer key; a layer serves its student only while marked ready, else the teacher.

    students: {"single:i": Student, ...} on the transformer's device (the route does not move them).
    ready: the keys marked ready at construction; `mark_ready` changes them (a readiness gate's call).
    min_image_tokens: calls with fewer image tokens (rows x cols) go to the teacher by design: below
        some size a student is slower than SDPA (on an H200, Flux's layers break even near 2048 px).
    """

    def __init__(
        self, students: Mapping[str, Student], *, ready: Iterable[str] = (), min_image_tokens: int = 0
    ) -> None:
        if min_image_tokens < 0:
            raise ValueError(f"min_image_tokens must be >= 0, got {min_image_tokens}")
        self.min_image_tokens = min_image_tokens
        self.students = dict(students)
        self.ready: set[str] = set()
        for key in ready:
            self.mark_ready(key)
        self.counters = RouteCounters()

    def mark_ready(self, key: str, ready: bool = True) -> None:
        if key not in self.students:
            raise KeyError(f"layer {key} has no student (students: {sorted(self.students)})")
        if ready:
            self.ready.add(key)
        else:
            self.ready.discard(key)

    def __call__(self, record: AttentionRecord) -> torch.Tensor:
        c = self.counters.layer(record.layer)
        c.calls += 1
        student = self.students.get(record.layer)
        if student is None:
            c.no_student += 1
            return teacher_attention(record)
        if record.layer not in self.ready:
            c.not_ready += 1
            return teacher_attention(record)
        if record.mask is not None:
            c.mask += 1
            return teacher_attention(record)
        if record.rows * record.cols < self.min_image_tokens:
            c.small += 1
            c.teacher += 1
            return teacher_attention(record)
        result = self._student(student, record)
        c.note_denominator(result.min_denominator)
        if result.nonfinite:
            c.note_nonfinite(result.nonfinite)
            return teacher_attention(record)
        c.student += 1
        return result.out.permute(0, 2, 1, 3)

    @staticmethod
    def _student(student: Student, record: AttentionRecord) -> StudentOutput:
        q, k, v = (x.permute(0, 2, 1, 3) for x in (record.q, record.k, record.v))  # [B, H, S, D]
        geometry = TokenGeometry(record.n_text, record.rows, record.cols)
        cfg = torch.full_like(record.sigma, 1.0 if record.cfg is None else record.cfg)  # no guidance: scale 1
        return student(q, k, v, geometry, record.sigma, cfg)
