"""An estimate of the memory one training step of a layer's student takes, from shapes and caps.

A trainer with a memory budget (`TrainerConfig.memory_budget_mib`) checks this estimate before each
capture's forward and raises `torch.OutOfMemoryError` when it is over: the same error, and so the
same out-of-memory ladder (core/distill/oom_ladder.py), as an allocator that runs out, but raised
before anything is allocated. On a GPU shared with the teacher it keeps the trainer inside its share;
the allocator's own error stays the ground truth when the estimate is low.

Per (batch item, head) pair, in fp32, with nq the trained queries (the capture's, at most query_cap)
plus the gates' probes (core/attention/student.py), qc = min(query_chunk, nq), kc = min(key_chunk, N)
over the N keys, F features, d head dim, h = max(d, 2F) the feature maps' hidden width, D their
depth, L = n_text + the image landmarks at landmark_cap (core/attention/landmarks.py), W the local
window's keys per query (n_text + (tile (2 radius + 1))^2, core/attention/local.py):

    held      3 nq d + 2 N d                 queries, output, teacher rows; fp32 copies of k and v
    kernel    F d + F + (kc + qc)(F + d + D h)  the key summary; one key and one query chunk
    landmark  2 L d + qc (L + d)              landmark keys and values; one query chunk's scores
    local     nq (W + d)                      each query's window scores and output

summed, times B H, times AUTOGRAD (the backward holds the forward's activations and makes gradients
of the same size), plus OPTIMIZER_COPIES fp32 copies of the parameters (weights, gradients, AdamW's
two moments), times SLACK for the allocator's rounding. Autograd keeps every chunk's activations for
the backward, so the chunk terms model a step's transient peak, not all it holds: the estimate is a
guard with a known shape, not a measurement; each rung of the ladder lowers it.
"""

from __future__ import annotations

from typing import NamedTuple

from core.attention.config import StudentConfig
from core.attention.landmarks import landmark_count
from core.distill.oom_ladder import TrainCaps

FP32 = 4
AUTOGRAD = 2.0
OPTIMIZER_COPIES = 4
SLACK = 1.1
PROBES = 64  # core.attention.student.GATE_PROBES: image positions that probe the gates' reference


class StepShape(NamedTuple):
    """The shapes of one capture as a training step sees them."""

    batch: int
    heads: int
    head_dim: int
    queries: int  # the capture's queries (before the ladder's query cap)
    tokens: int  # every key: conditioning then image tokens
    text: int
    image: int


def training_step_bytes(shape: StepShape, student: StudentConfig, caps: TrainCaps, *, parameters: int) -> int:
    """Estimated bytes of one capture's training step at `caps` (module docstring)."""
    d, f, n = shape.head_dim, student.features, shape.tokens
    hidden = max(d, 2 * f) * student.feature_depth
    nq = min(shape.queries, caps.query_cap) + min(PROBES, shape.image)
    qc, kc = min(caps.query_chunk, nq), min(caps.key_chunk, n)
    most = min(student.landmark_max, caps.landmark_cap)
    landmarks = shape.text + landmark_count(
        shape.image, fraction=student.landmark_fraction, minimum=student.landmark_min, maximum=most
    )
    window = shape.text + (student.local_tile * (2 * student.local_radius + 1)) ** 2
    held = 3 * nq * d + 2 * n * d
    kernel = f * d + f + (kc + qc) * (f + d + hidden)
    landmark = 2 * landmarks * d + qc * (landmarks + d)
    local = nq * (window + d)
    activations = FP32 * shape.batch * shape.heads * (held + kernel + landmark + local) * AUTOGRAD
    return int((activations + FP32 * OPTIMIZER_COPIES * parameters) * SLACK)
