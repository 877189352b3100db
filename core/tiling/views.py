"""Views: the pieces of a latent that one model call sees, and how they are batched.

A step of a tiled or global sampler builds a list of views (tiles, dilated sub-lattices, a full
frame), hands the whole list to an injected `evaluate` callable, and fuses what comes back. The
runner's evaluate sends batches to GPU actors; `evaluate_in_process` runs them here. Both batch
with `plan_batches`, so the grouping (and with it every kernel's input shapes) is a function of the
views alone, never of the number of workers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from core.rope.spec import RopeSpec


@dataclass(frozen=True)
class ViewInput:
    """One model call's input: a latent view x [C, h, w] at flow time sigma.

    rope: the RoPE extension to use when the view is larger than the model's native grid
    (None: plain RoPE). Views are batched only with views of equal shape and rope.
    step, view_id: the sampler step and the view's position in that step's view list, for the
    attention routes (core/models/attention_hook.py: AttentionCall); `compose_velocity` sets them.
    They never change the velocity of an unrouted model and never split a batch.
    """

    x: torch.Tensor
    sigma: float
    rope: RopeSpec | None = None
    step: int | None = None
    view_id: int | None = None


Evaluate = Callable[[Sequence[ViewInput]], list[torch.Tensor]]
"""Maps views to their velocities [C, h, w], in the order given."""


class Plan(Protocol):
    """A per-step decomposition of the latent into views, and the fusion of their outputs."""

    def views(self, x: torch.Tensor, sigma: float, step: int) -> list[ViewInput]: ...

    def fuse(self, x: torch.Tensor, outputs: Sequence[torch.Tensor], sigma: float, step: int) -> torch.Tensor:
        """Velocity for the whole latent x [1, C, H, W] from this plan's view outputs."""
        ...


def batch_key(view: ViewInput) -> tuple:
    """Views with equal keys can share one forward: same shape and the same RoPE tables.

    A dynamic (DyPE) rope depends on sigma, so sigma joins the key only then.
    """
    rope = view.rope if view.rope is not None and view.rope.method != "none" else None
    sigma = view.sigma if rope is not None and rope.dynamic else None
    return (tuple(view.x.shape), view.x.dtype, rope, sigma)


def plan_batches(
    views: Sequence[ViewInput], max_batch: int | Callable[[tuple[int, ...]], int]
) -> list[list[int]]:
    """Indices of `views` grouped into batches of equal key, at most `max_batch` each.

    max_batch is a number, or a function of the view shape [C, h, w] (memory-based sizing). Groups
    keep first-appearance order and views keep index order inside a group, so the batches are a pure
    function of the view list and max_batch.
    """
    groups: dict[tuple, list[int]] = {}
    for i, view in enumerate(views):
        groups.setdefault(batch_key(view), []).append(i)
    batches = []
    for key, idx in groups.items():
        limit = max_batch(key[0]) if callable(max_batch) else max_batch
        if limit < 1:
            raise ValueError(f"max_batch must be >= 1, got {limit} for views of shape {key[0]}")
        batches.extend(idx[j : j + limit] for j in range(0, len(idx), limit))
    return batches


def stack_batch(
    views: Sequence[ViewInput], idx: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor, RopeSpec | None]:
    """(x [B, C, h, w], sigma [B] float32, rope) for one batch of views."""
    x = torch.stack([views[i].x for i in idx])
    sigma = torch.tensor([views[i].sigma for i in idx], dtype=torch.float32)
    return x, sigma, views[idx[0]].rope


def batch_ids(views: Sequence[ViewInput], idx: Sequence[int]) -> tuple[int | None, tuple[int, ...] | None]:
    """(step, view ids) of one batch for the attention routes: the step when every view names the
    same one (else None), the view ids when every view has one (else None)."""
    steps = {views[i].step for i in idx}
    step = steps.pop() if len(steps) == 1 else None
    ids = tuple(views[i].view_id for i in idx)
    return step, (None if any(v is None for v in ids) else ids)  # type: ignore[return-value]


def full_frame_view(x: torch.Tensor, sigma: float, rope: RopeSpec | None = None) -> ViewInput:
    """The whole latent x [1, C, H, W] as one view (the untiled step)."""
    if x.shape[0] != 1:
        raise ValueError(f"views are cut from a single latent [1, C, H, W], got batch {x.shape[0]}")
    return ViewInput(x[0], sigma, rope)


class FullFramePlan:
    """The untiled step as a Plan: one view of the whole latent (DyPE extends RoPE beyond native)."""

    def __init__(self, rope: RopeSpec | None = None) -> None:
        self.rope = rope

    def views(self, x: torch.Tensor, sigma: float, step: int) -> list[ViewInput]:
        return [full_frame_view(x, sigma, self.rope)]

    def fuse(self, x: torch.Tensor, outputs: Sequence[torch.Tensor], sigma: float, step: int) -> torch.Tensor:
        if len(outputs) != 1:
            raise ValueError(f"a full-frame plan fuses one output, got {len(outputs)}")
        return outputs[0].unsqueeze(0).to(x.device)
