"""Evaluating views on a backbone held by this process."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from core.models.backbone import Backbone, Cond
from core.tiling.views import ViewInput, plan_batches, stack_batch


def evaluate_in_process(
    backbone: Backbone, cond: Cond, views: Sequence[ViewInput], *, max_batch: int = 4
) -> list[torch.Tensor]:
    """Evaluate views on a backbone held by this process, batched exactly as the runner batches."""
    out: list[torch.Tensor | None] = [None] * len(views)
    for idx in plan_batches(views, max_batch):
        x, sigma, rope = stack_batch(views, idx)
        with torch.no_grad():
            v = backbone.velocity(x, sigma.to(x.device), cond, rope)
        for j, i in enumerate(idx):
            out[i] = v[j]
    return out  # type: ignore[return-value]
