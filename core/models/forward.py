"""The one per-batch forward, shared by the in-process pool and the Ray workers.

A call's views are grouped by `view_batches` (core.tiling.views.plan_batches: equal shape and RoPE,
a function of the views alone) and stacked: x [B, C, h, w], sigma [B], rope. Each batch is one
`forward_batch`: the backbone packs it into tokens, builds the position ids and RoPE tables, runs
the transformer and unpacks (core/models/flux.py). `place` puts each velocity back at its view's
index. In process the three run back to back (`evaluate_in_process`); over Ray the driver stacks
and places, and the worker that got a batch runs `forward_batch` on it (runner/pool/).

Decision, dtype: a velocity comes back in the dtype of the views it was computed for (the latent's
dtype: float32 from the VAE adapters), whatever the model computes in (bfloat16 on CUDA). Rounding
to the model's dtype then happens once, inside the model, while the sampler's own arithmetic on the
whole latent (tile fusion weights, skip-residual mixing, Euler steps) stays in the latent's
precision, and the result does not depend on which path ran the model: `forward_batch` casts for
both, and the Ray transport carries every dtype unchanged (runner/pool/transport.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from core.models.backbone import Backbone, Cond
from core.rope.spec import RopeSpec
from core.tiling.views import ViewInput, batch_ids, plan_batches, stack_batch


@dataclass(frozen=True, eq=False)
class ViewBatch:
    """Views of one shape and RoPE stacked for one forward; `index`: their positions in the call.
    step, view_ids: what the attention routes are told (core.tiling.views.batch_ids)."""

    index: tuple[int, ...]
    x: torch.Tensor  # [B, C, h, w]
    sigma: torch.Tensor  # [B] float32
    rope: RopeSpec | None
    step: int | None = None
    view_ids: tuple[int, ...] | None = None


def view_batches(
    views: Sequence[ViewInput], max_batch: int | Callable[[tuple[int, ...]], int]
) -> list[ViewBatch]:
    return [
        ViewBatch(tuple(idx), *stack_batch(views, idx), *batch_ids(views, idx))
        for idx in plan_batches(views, max_batch)
    ]


def forward_batch(
    backbone: Backbone,
    cond: Cond,
    x: torch.Tensor,
    sigma: torch.Tensor,
    rope: RopeSpec | None,
    *,
    device: torch.device | None = None,
    step: int | None = None,
    view_ids: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Velocities [B, C, h, w] of one stacked batch, in x's dtype, on `device` (None: x's device).
    Inference only (no autograd). step, view_ids: for attention routes (read only when one is attached)."""
    if device is not None:
        x = x.to(device)
    with torch.no_grad():
        v = backbone.velocity(x, sigma.to(x.device), cond, rope, step=step, view_ids=view_ids)
    return v.to(x.dtype)


def place(out: list[torch.Tensor | None], batch: ViewBatch, v: torch.Tensor) -> None:
    """Put the velocities v [B, C, h, w] of `batch` at their views' positions in `out`."""
    if v.shape[0] != len(batch.index):
        raise ValueError(f"a batch of {len(batch.index)} views got {v.shape[0]} velocities")
    for j, i in enumerate(batch.index):
        out[i] = v[j]


def evaluate_in_process(
    backbone: Backbone, cond: Cond, views: Sequence[ViewInput], *, max_batch: int = 4
) -> list[torch.Tensor]:
    """Velocities of `views`, in order, from a backbone held by this process, batched as the pool batches."""
    out: list[torch.Tensor | None] = [None] * len(views)
    for batch in view_batches(views, max_batch):
        v = forward_batch(
            backbone, cond, batch.x, batch.sigma, batch.rope, step=batch.step, view_ids=batch.view_ids
        )
        place(out, batch, v)
    return out  # type: ignore[return-value]
