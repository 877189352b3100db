"""One step's velocity over the whole latent from a local plan and an optional global one.

    v(x, sigma, k) = (1 - c2) * local.fuse(...) + c2 * global.fuse(...)     (DemoFusion, arXiv 2311.16973)

All views of a step (local tiles and global sub-lattices) go to `evaluate` in ONE call, so one
step is one barrier across the pool.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from core.flow.sampling import ModelFn
from core.tiling.dilated import fuse_global
from core.tiling.views import Evaluate, Plan


def compose_velocity(
    local: Plan,
    evaluate: Evaluate,
    *,
    global_plan: Plan | None = None,
    on_views: Callable[[int, int], None] | None = None,
) -> ModelFn:
    """A model_fn(x, sigma, step) -> v over the whole latent from a local plan and an optional global one.

    on_views(step, n_views) observes how many views each step evaluated (for progress and job.json).
    Each view is stamped with the step and its index in the step's list (local views first), which
    attention routes receive (core/models/attention_hook.py); the velocities do not depend on them.
    """

    def model_fn(x: torch.Tensor, sigma: float, step: int) -> torch.Tensor:
        local_views = local.views(x, sigma, step)
        global_views = global_plan.views(x, sigma, step) if global_plan is not None else []
        views = [
            dataclasses.replace(v, step=step, view_id=i) for i, v in enumerate(local_views + global_views)
        ]
        outputs = evaluate(views) if views else []
        n = len(local_views)
        v = local.fuse(x, outputs[:n], sigma, step).to(x.dtype)
        if global_plan is not None:
            v_global = global_plan.fuse(x, outputs[n:], sigma, step).to(x.dtype)
            v = fuse_global(v, v_global, sigma)
        if on_views is not None:
            on_views(step, len(outputs))
        return v

    return model_fn
