"""Building a phase's views: the local plan (full frame, grid or quadtree tiles, Spot), the global
dilated plan, and the exact per-tile start steps. Pure functions of the config and the sizes."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from core.flow.seeds import derive_seed
from core.rope.spec import RopeSpec
from core.tiling.dilated import DilatedPlan
from core.tiling.quadtree import Leaf, assign_denoise, build_quadtree, quadtree_tiles
from core.tiling.tile_plans import SpotPlan, TilePlan, tile_start_indices
from core.tiling.tiles import Tile, grid_tiles
from core.tiling.views import FullFramePlan, Plan
from core.upscale.resize import resize_image
from tasks.upscale_config import CoherenceConfig, TilingConfig


@dataclass
class LocalPlan:
    """A phase's local views and what the sampler needs around them."""

    plan: Plan
    first_step: int  # index in the full schedule where this phase's sampling starts
    activity: Callable[[int], torch.Tensor] | None  # exact per-tile denoise pinning, or None
    tiles: list[Tile]  # for the seam metric and job.json (empty for a full frame)
    leaves: list[Leaf]  # quadtree leaves in image pixels (empty for a grid)
    tile_denoise: list[float]  # per-tile denoise actually used (quadtree)


def img2img_start(steps: int, denoise: float) -> int:
    """diffusers `get_timesteps`: the pass starts at index int(N - min(N d, N))."""
    return int(steps - min(steps * denoise, steps))


def tile_geometry(tiling: TilingConfig, native_px: int, scale: int) -> tuple[int, int]:
    """(tile, overlap) in latent pixels, both even; tile 0 = native size, overlap -1 = tile / 4."""
    tile_px = tiling.tile or native_px
    overlap_px = tiling.overlap if tiling.overlap >= 0 else tile_px // 4
    tile = tile_px // scale // 2 * 2
    overlap = overlap_px // scale // 2 * 2
    return tile, overlap


def build_local_plan(
    tiling: TilingConfig,
    *,
    height: int,
    width: int,
    native_px: int,
    scale: int,
    steps: int,
    denoise: float,
    seed: int,
    rope: RopeSpec,
    image: torch.Tensor | None,
    reference: torch.Tensor,
    sigmas: list[float],
) -> LocalPlan:
    """The local plan of a height x width latent for a phase of `steps` (full schedule) at `denoise`.

    Quadtree per-tile denoise: leaf i runs at its own d_i = d_min + (d_max - d_min)(1 - area_i /
    area_max) (section 7.2), whatever the phase denoise; the returned leaves carry the values used.
    `image` is the phase's input image at this phase's pixel size (the quadtree is built on it).
    """
    start = img2img_start(steps, denoise)
    if tiling.method == "none":
        return LocalPlan(FullFramePlan(rope), start, None, [], [], [])
    tile, overlap = tile_geometry(tiling, native_px, scale)
    tile_h, tile_w = min(tile, height), min(tile, width)

    def spot(tiles: list[Tile] | None) -> SpotPlan:
        """SpotDiffusion's moving grid; given tiles (quadtree leaves) move by rolling the latent."""
        wrap = tiling.spot_wrap or tiles is not None
        return SpotPlan(
            height, width, tile=(tile_h, tile_w), seed=derive_seed(seed, "spot"), mode=tiling.spot_mode,
            wrap=wrap, tiles=tiles, rope=rope, steps=steps,
        )  # fmt: skip

    if tiling.layout == "grid":
        if tiling.method == "spot":
            plan = spot(None)
            return LocalPlan(plan, start, None, plan.grid, [], [])
        tiles = grid_tiles(
            height, width, tile=(tile_h, tile_w), overlap=min(overlap, tile_h // 2, tile_w // 2) // 2 * 2
        )
        plan = TilePlan(tiles, method=tiling.method, height=height, width=width, rope=rope)
        return LocalPlan(plan, start, None, tiles, [], [])

    q = tiling.quadtree
    if image is None:
        raise ValueError("quadtree tiles need the phase's input image")
    leaves = build_quadtree(
        image[0].float(),
        threshold=q.threshold,
        min_tile=q.min_tile,
        max_tile=q.max_tile or native_px,
        align=16,
        criterion=q.criterion,
    )
    leaves = assign_denoise(leaves, q.denoise_min, q.denoise_max)
    qtiles = quadtree_tiles(
        leaves,
        height,
        width,
        overlap=overlap,
        scale=scale,
        skip_diffusion_below=q.skip_diffusion_below,
        align=2,
    )
    tiles = list(qtiles)
    method = "multidiffusion" if tiling.method == "spot" else tiling.method
    if tiling.method == "spot":  # config rejects skip_diffusion_below and variable denoise here
        return LocalPlan(spot(tiles), start, None, tiles, leaves, [])
    # skip_diffusion_below: those tiles never start (section 7.4b), so they keep the input in every mode.
    skipped = [min(leaf.w, leaf.h) < q.skip_diffusion_below for leaf in leaves]
    if q.variable_denoise and q.denoise_mode == "exact":
        per_tile = [0.0 if skip else leaf.denoise for leaf, skip in zip(leaves, skipped, strict=True)]
    else:
        per_tile = [0.0 if skip else denoise for skip in skipped]
    starts = [steps if skip else start for skip in skipped]
    compat = None
    if q.variable_denoise and q.denoise_mode == "comfy_compat":  # the phase runs at `denoise`; tiles blend
        compat = [0.0 if skip else leaf.denoise for leaf, skip in zip(leaves, skipped, strict=True)]
    elif q.variable_denoise:
        starts = tile_start_indices(per_tile, steps)
    leaves = [
        dataclasses.replace(leaf, denoise=d) for leaf, d in zip(leaves, compat or per_tile, strict=True)
    ]
    pinned = any(s > start for s in starts) or (q.variable_denoise and q.denoise_mode == "exact")
    plan = TilePlan(
        tiles,
        method=method,
        start_index=starts if pinned else None,
        compat_denoise=compat,
        sigmas=sigmas if compat else None,
        reference=reference if compat else None,
        height=height,
        width=width,
        rope=rope,
    )
    first = min(starts) if q.variable_denoise and compat is None else start
    return LocalPlan(plan, first, plan.activity if pinned else None, tiles, leaves, compat or per_tile)


def dilated_factor(coherence: CoherenceConfig, height: int, width: int, native: int) -> int:
    """DemoFusion's s: the configured factor, or the smallest that brings a sub-lattice to the native size."""
    if coherence.factor:
        return coherence.factor
    return max(1, math.ceil(max(height, width) / native))


def build_global_plan(
    coherence: CoherenceConfig, *, height: int, width: int, native: int, rope: RopeSpec
) -> DilatedPlan | None:
    if not coherence.dilated:
        return None
    s = dilated_factor(coherence, height, width, native)
    if s < 2:
        return None
    return DilatedPlan(
        s,
        blur_sigma=coherence.blur_sigma,
        cosine_scale_3=coherence.cosine_scale_3,
        rope=rope,
        native_size=native,
        align=2,
    )


def quadtree_image(source: torch.Tensor, height_px: int, width_px: int) -> torch.Tensor:
    """The image the quadtree of a phase is built on: the input resized to the phase's pixel size."""
    if tuple(source.shape[-2:]) == (height_px, width_px):
        return source
    return resize_image(source, (height_px, width_px), "bicubic")
