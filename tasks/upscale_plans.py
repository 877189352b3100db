"""The views of one phase: the local plan (full frame, grid or quadtree tiles, Spot) with its per-tile
start steps, and the global dilated plan. Pure functions of the config, the sizes and the image the
quadtree is built on (docs/upscale.md, "Tiles" and "Quadtree").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from core.flow.schedules import img2img_start
from core.flow.seeds import derive_seed
from core.rope.spec import RopeSpec
from core.tiling.dilated import DilatedPlan
from core.tiling.quadtree import Leaf, assign_denoise, build_quadtree, quadtree_tiles
from core.tiling.tile_plans import SpotPlan, TilePlan
from core.tiling.tiles import Tile, grid_tiles
from core.tiling.views import FullFramePlan, Plan
from core.upscale.resize import resize_image
from tasks.upscale_config import AUTO, CoherenceConfig, TilingConfig

QUADTREE_ALIGN = 16  # leaves in image pixels land on whole 2 x 2 Flux tokens of an 8x VAE


@dataclass(frozen=True)
class Geometry:
    """What a phase's local plan is cut for: a height x width latent whose schedule is `sigmas`."""

    height: int
    width: int
    sigmas: list[float]  # the FULL schedule; a pass starts at img2img_start(len - 1, denoise)
    denoise: float
    seed: int
    native_px: int  # the model's native size in image pixels
    scale: int  # image pixels per latent pixel
    rope: RopeSpec

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1


@dataclass(frozen=True)
class CompatBlend:
    """comfy_compat quadtree denoise: upstream's per-tile x0 blend, over the full schedule."""

    denoise: list[float]
    sigmas: list[float]


@dataclass(frozen=True)
class LocalPlan:
    """A phase's local views and what the sampler needs around them."""

    plan: Plan
    first_step: int  # index in the full schedule where this phase's sampling starts
    activity: Callable[[int], torch.Tensor] | None  # per-tile start pinning, or None
    tiles: list[Tile]  # for the seam metric and job.json (empty for a full frame)
    leaves: list[Leaf]  # quadtree leaves in image pixels, carrying the denoise used (empty for a grid)
    tile_denoise: list[float]  # per-tile denoise used (quadtree)
    compat: CompatBlend | None = None  # needs the phase's reference, known only once it is resized

    def plan_for(self, reference: torch.Tensor) -> Plan:
        """The plan of a phase whose resized input is `reference` (only the comfy_compat blend reads it)."""
        if self.compat is None:
            return self.plan
        base = self.plan
        assert isinstance(base, TilePlan)
        return TilePlan(
            base.tiles,
            method=base.method,
            start_index=base.start_index,
            compat_denoise=self.compat.denoise,
            sigmas=self.compat.sigmas,
            reference=reference,
            height=base.height,
            width=base.width,
            rope=base.rope,
        )


def tile_geometry(tiling: TilingConfig, native_px: int, scale: int) -> tuple[int, int]:
    """(tile, overlap) in latent pixels, both even; tile 0 = native size, overlap -1 = tile / 4."""
    tile_px = tiling.tile or native_px
    overlap_px = tiling.overlap if tiling.overlap >= 0 else tile_px // 4
    return tile_px // scale // 2 * 2, overlap_px // scale // 2 * 2


def build_local_plan(
    tiling: TilingConfig, g: Geometry, *, image: torch.Tensor | None, variable_denoise: bool = True
) -> LocalPlan:
    """The local plan of a phase. `image` is the phase's input image at its pixel size (the quadtree
    is built on it); variable_denoise=False runs every quadtree tile at the phase denoise."""
    start = img2img_start(g.steps, g.denoise)
    if tiling.method == "none":
        return LocalPlan(FullFramePlan(g.rope), start, None, [], [], [])
    tile, overlap = tile_geometry(tiling, g.native_px, g.scale)
    tile_hw = (min(tile, g.height), min(tile, g.width))
    if tiling.layout == "grid" and tiling.method == "spot":
        plan = _spot(tiling, g, tile_hw, None)
        return LocalPlan(plan, start, None, plan.grid, [], [])
    if tiling.layout == "grid":
        tiles = grid_tiles(
            g.height, g.width, tile=tile_hw, overlap=min(overlap, tile_hw[0] // 2, tile_hw[1] // 2) // 2 * 2
        )
        plan = TilePlan(tiles, method=tiling.method, height=g.height, width=g.width, rope=g.rope)
        return LocalPlan(plan, start, None, tiles, [], [])
    if image is None:
        raise ValueError("quadtree tiles need the phase's input image")
    leaves = quadtree_leaves(tiling, g, image)
    tiles = quadtree_tiles(leaves, g.height, g.width, overlap=overlap, scale=g.scale, align=2)
    if tiling.method == "spot":  # the config rejects skip_diffusion_below and variable denoise here
        return LocalPlan(_spot(tiling, g, tile_hw, tiles), start, None, tiles, leaves, [])
    return _quadtree_plan(
        tiling, g, leaves, tiles, variable=variable_denoise and tiling.quadtree.variable_denoise
    )


def quadtree_leaves(tiling: TilingConfig, g: Geometry, image: torch.Tensor) -> list[Leaf]:
    """The leaves of image [1, 3, H, W] with their area-based denoise (unset knobs: the criterion's)."""
    q = tiling.quadtree
    leaves = build_quadtree(
        image[0].float(),
        threshold=q.threshold,
        min_tile=q.min_tile,
        max_tile=q.max_tile or g.native_px,
        align=QUADTREE_ALIGN,
        criterion=q.criterion,
    )
    return assign_denoise(leaves, q.denoise_min, q.denoise_max)


def _spot(tiling: TilingConfig, g: Geometry, tile_hw: tuple[int, int], tiles: list[Tile] | None) -> SpotPlan:
    """SpotDiffusion's moving grid; given tiles (quadtree leaves) move by rolling the latent."""
    return SpotPlan(
        g.height, g.width, tile=tile_hw, seed=derive_seed(g.seed, "spot"), mode=tiling.spot_mode,
        wrap=tiling.spot_wrap or tiles is not None, tiles=tiles, rope=g.rope, steps=g.steps,
    )  # fmt: skip


def _quadtree_plan(
    tiling: TilingConfig, g: Geometry, leaves: list[Leaf], tiles: list[Tile], *, variable: bool
) -> LocalPlan:
    """Fused quadtree tiles; each tile's denoise and start step, recorded on its leaf.

    exact: tile i runs at its leaf's denoise from img2img_start(N, d_i), pinned until then;
    comfy_compat: the phase runs at its denoise and the upstream x0 blend uses the leaf's;
    uniform (variable off): every tile at the phase denoise. In every mode a leaf shorter than
    skip_diffusion_below never starts, so it keeps the input.
    """
    q = tiling.quadtree
    start = img2img_start(g.steps, g.denoise)
    skipped = [min(leaf.rect.h, leaf.rect.w) < q.skip_diffusion_below for leaf in leaves]
    exact = variable and q.denoise_mode == "exact"
    compat = variable and q.denoise_mode == "comfy_compat"
    own = [
        0.0 if skip else (leaf.denoise if variable else g.denoise)
        for leaf, skip in zip(leaves, skipped, strict=True)
    ]
    starts = [img2img_start(g.steps, d) for d in own] if exact else [g.steps if s else start for s in skipped]
    pinned = exact or any(skipped)
    plan = TilePlan(
        tiles,
        method=tiling.method,
        start_index=starts if pinned else None,
        height=g.height,
        width=g.width,
        rope=g.rope,
    )
    used = [leaf.denoise if compat else d for leaf, d in zip(leaves, own, strict=True)]
    leaves = [
        dataclasses.replace(leaf, denoise=0.0 if skip else d)
        for leaf, d, skip in zip(leaves, used, skipped, strict=True)
    ]
    return LocalPlan(
        plan,
        min(starts) if exact else start,
        plan.activity if pinned else None,
        tiles,
        leaves,
        [leaf.denoise for leaf in leaves],
        CompatBlend([leaf.denoise for leaf in leaves], g.sigmas) if compat else None,
    )


def dilated_factor(coherence: CoherenceConfig, height: int, width: int, native: int) -> int:
    """DemoFusion's s: the configured factor, or ("auto") the smallest that brings a sub-lattice to
    the native size; 0 = off."""
    if coherence.dilated != AUTO:
        return int(coherence.dilated)
    return max(1, math.ceil(max(height, width) / native))


def build_global_plan(
    coherence: CoherenceConfig, *, height: int, width: int, native: int, rope: RopeSpec
) -> DilatedPlan | None:
    """The dilated global views of a height x width latent (native: the model's latent side), or None."""
    s = dilated_factor(coherence, height, width, native)
    if s < 2:
        return None
    return DilatedPlan(s, blur_sigma=coherence.blur_sigma, rope=rope, native_size=native, align=2)


def quadtree_image(source: torch.Tensor, height_px: int, width_px: int) -> torch.Tensor:
    """The image a phase's quadtree is built on: the input resized to the phase's pixel size."""
    if tuple(source.shape[-2:]) == (height_px, width_px):
        return source
    return resize_image(source, (height_px, width_px), "bicubic")
