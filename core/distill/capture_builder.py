"""From an attention call to a replay capture: `build_capture(record, teacher_out, query_index, meta)`.

The record (core/models/attention_hook.py) holds the call's post-RoPE q, k, v [B, S, H, D] and the
teacher's output [B, S, H, D] (what a CaptureRoute's callback receives, core/attention/routes.py);
the capture (core/distill/capture.py) keeps, for one batch item, the queries and teacher rows at
`query_index` and every key and value, as [1, H, n, D]. Every tensor is a fresh contiguous copy,
so the capture outlives the forward's activations. Where the copy runs (a side stream, pinned
memory) is the caller's decision: this is plain tensor code on the record's device. The query index
stays where the caller made it (the plan's is on the CPU): on a device, checking it would make the
host wait for the forward.

One capture per batch item: the views of one upscale batch carry their own sigma, and a capture has
one. A call with an attention mask is refused: a student never serves a masked call, so it must not
learn from one; neither is a call without a sampler step (the capture's step is its identity in a
run).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.attention.geometry import index_to
from core.distill.capture import DTYPE_NAMES, Capture, CaptureMeta
from core.models.attention_hook import AttentionRecord


@dataclass(frozen=True, kw_only=True)
class CaptureSource:
    """What the record cannot know: which prompt and listed seed the run came from."""

    prompt_id: int
    seed_id: int


def build_capture(
    record: AttentionRecord,
    teacher_out: torch.Tensor,
    query_index: torch.Tensor,
    meta: CaptureSource,
    *,
    item: int = 0,
    dtype: torch.dtype | None = None,
) -> Capture:
    """The capture of batch item `item` of `record`, in `dtype` (default: the record's)."""
    b, s, h, d = record.q.shape
    if teacher_out.shape != record.q.shape:
        raise ValueError(
            f"teacher output {tuple(teacher_out.shape)} must match the record's q {tuple(record.q.shape)}"
        )
    if not 0 <= item < b:
        raise ValueError(f"capture item must be in [0, {b}), got {item}")
    if record.mask is not None:
        raise ValueError(f"layer {record.layer}: a call with an attention mask cannot be captured")
    if record.step is None:
        raise ValueError(f"layer {record.layer}: the call has no sampler step; pass step= to the forward")
    dtype = record.q.dtype if dtype is None else dtype
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"capture dtype must be one of {sorted(DTYPE_NAMES.values())}, got {dtype}")
    if query_index.ndim != 1 or (
        len(query_index) and not 0 <= int(query_index.min()) <= int(query_index.max()) < s
    ):
        raise ValueError(
            f"capture query_index must lie in [0, {s}) and be 1-D, got {tuple(query_index.shape)} "
            f"{query_index.tolist() if query_index.numel() <= 8 else '...'}"
        )
    index = index_to(query_index.to(dtype=torch.int64), record.q.device)

    def heads_first(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        x = x[item : item + 1].permute(0, 2, 1, 3)  # [1, H, S, D], a view
        if rows is not None:
            x = x.index_select(2, rows)
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
        return out.copy_(x)  # one copy, contiguous, independent of the forward's memory

    capture_meta = CaptureMeta(
        layer=record.layer,
        step=record.step,
        sigma=float(record.sigma[item]),
        cfg=1.0 if record.cfg is None else float(record.cfg),  # no guidance: scale 1, as StudentRoute
        text_len=record.n_text,
        latent_h=record.rows,
        latent_w=record.cols,
        prompt_id=meta.prompt_id,
        seed_id=meta.seed_id,
    )
    return Capture(
        meta=capture_meta,
        q_sub=heads_first(record.q, index),
        k=heads_first(record.k, None),
        v=heads_first(record.v, None),
        teacher_sub=heads_first(teacher_out, index),
        query_index=query_index.to(dtype=torch.int64).clone(),  # on the caller's device (the plan's: CPU)
    )
