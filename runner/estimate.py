"""The size of a job before it starts, and the pixel budget above which it needs to be asked for.

`scale: 64` on a 256 px photo plans a 16384 x 16384 px upscale: about 7 000 views a step on the
reference model, for hours, and a driver holding several full-size float32 copies of the image (the
source resized, the result, the bicubic comparison: 3.2 GB each at that size). Such a job starts
only when asked for (`tessera run --allow-large`); every job prints its estimate first.

The estimate counts what the plan will do from the config and the input's size alone, before any
model is loaded: the phase sizes (core.upscale.phases.plan_phase_sizes, the task's own rule), the
local tiles of each phase at the model's native size (or tiling.tile), the dilated global views,
and the steps each phase runs (its denoise share of the schedule). It is an estimate: quadtree
layouts and the refinement pass are counted as a plain grid.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from core.models.loading import FLUX_NATIVE_SIZE, TINY_NATIVE_SIZE
from core.upscale.phases import plan_phase_sizes
from runner.models import WEIGHTS
from tasks.upscale_plans import dilated_factor

PIXEL_BUDGET = 8192 * 8192  # output pixels a job may have without --allow-large
VAE_FACTOR = 8  # image pixels per latent pixel of every VAE the models use (Flux.1's KL, TAEF2)
SIZE_ALIGN = 16


@dataclass(frozen=True)
class Estimate:
    """What a job will compute: output pixels, phases, model views per step and forwards in all."""

    height: int
    width: int
    phases: int
    views_per_step: list[int]  # per phase, local tiles plus global views
    forwards: int  # view evaluations over the whole job

    @property
    def pixels(self) -> int:
        return self.height * self.width

    def describe(self) -> str:
        views = ", ".join(f"{v:,}" for v in self.views_per_step)
        return (
            f"{self.height} x {self.width} px ({self.pixels / 1e6:.1f} MP) in {self.phases} phase(s), "
            f"~{views} views per step, ~{self.forwards:,} forwards"
        )


def native_px(model: Any) -> int:
    """The model's native image size in pixels (its training resolution)."""
    if model.kind == "flux" or (model.kind == "random" and model.shape == "flux-dev"):
        return FLUX_NATIVE_SIZE * VAE_FACTOR
    if model.kind == "random":
        return TINY_NATIVE_SIZE * VAE_FACTOR
    meta = Path(model.path or WEIGHTS.reference) / "reference.json"
    native = json.loads(meta.read_text())["native_size"] if meta.is_file() else TINY_NATIVE_SIZE
    return int(native) * VAE_FACTOR


def _axis_views(length: int, tile: int, overlap: int) -> int:
    if length <= tile:
        return 1
    return math.ceil((length - tile) / (tile - overlap)) + 1


def upscale(cfg: Any) -> Estimate:
    """The estimate of an upscale job (tasks/upscale_config.py's UpscaleConfig)."""
    with Image.open(cfg.image) as im:
        width, height = im.size
    if tuple(cfg.target) != (0, 0):
        target = (int(cfg.target[0]), int(cfg.target[1]))
    else:
        target = (round(height * cfg.scale), round(width * cfg.scale))
    sizes = plan_phase_sizes(
        (height, width), target, max_scale=cfg.max_scale, phases=cfg.phases or None, align=SIZE_ALIGN
    )
    native = native_px(cfg.model)
    tile = cfg.tiling.tile or native
    overlap = cfg.tiling.overlap if cfg.tiling.overlap >= 0 else tile // 4
    denoises = cfg.phase_denoise(len(sizes))
    per_step, forwards = [], 0
    for (h, w), denoise in zip(sizes, denoises, strict=True):
        tiled = _axis_views(h, tile, overlap) * _axis_views(w, tile, overlap)
        local = 1 if cfg.tiling.method == "none" else tiled
        factor = dilated_factor(cfg.coherence, h, w, native)  # the task's rule (pixels: same ratio)
        views = local + (factor * factor if factor > 1 else 0)
        per_step.append(views)
        forwards += views * max(1, round(cfg.steps * denoise))
    return Estimate(target[0], target[1], len(sizes), per_step, forwards)
