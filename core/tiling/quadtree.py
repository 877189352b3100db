"""Content-adaptive quadtree tiles (behaviour of rickyars/comfyui-quadtree-tile; docs/upscale.md).

The tree is built in image pixels from the input image: busy regions are split into four, flat
ones stay large. Each leaf gets a denoise strength from its relative area (small busy leaves are
regenerated more), and becomes one latent tile grown by an overlap.

Decisions:
- Root = (0, 0, floor(H/align)*align, floor(W/align)*align), never the upstream power-of-two square
  that reached outside the image. Leaves are listed depth-first in TL, TR, BL, BR order.
- Built leaves carry denoise = 1.0 until `assign_denoise` sets it.
- "variance" defaults to a 64 px minimum leaf [ours], not upstream's 4 px: a leaf becomes a latent
  tile of leaf / 8 pixels, and below 64 px that is 4 x 4 Flux tokens, too little context to
  denoise. Upstream's split rule itself is unchanged (min_tile=4 reproduces it).
- `max_tile` caps the leaf size [ours]: a leaf wider or taller than it splits whatever its score
  (down to `align`, past max_depth), so flat regions never become views far beyond the model's
  native size. Upstream has no cap.
- "legacy" criterion: (w_c MAD + w_g mean Sobel magnitude) / (w_c + w_g) >= 0.03 on the [0, 1]
  image, depth < 4, halves >= 256 px. The Sobel filter sees the region with replicate padding
  [ours]: upstream zero-padded each region, so flat non-black regions scored edges at their border.
- The builder works on one image; callers loop over a batch and keep one leaf list per item
  (upstream keeps only the last item's leaves).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from core.tiling.rect import Rect
from core.tiling.tiles import Tile

Criterion = Literal["variance", "legacy"]
CRITERIA: tuple[Criterion, ...] = ("variance", "legacy")
_DEFAULTS = {"variance": (25.0, 64, None), "legacy": (0.03, 256, 4)}  # threshold, min_tile, max_depth


@dataclass(frozen=True)
class Leaf:
    """A quadtree leaf: its rectangle in image pixels, depth, split score (of its criterion) and denoise."""

    rect: Rect
    depth: int
    score: float
    denoise: float = 1.0


def rgb_variation(region: torch.Tensor) -> float:
    """sqrt(Var_R + Var_G + Var_B) of a [3, h, w] region in [0, 1], on the 0-255 scale (population var)."""
    region = region.to(torch.float32) * 255.0
    return float(region.var(dim=(-2, -1), correction=0).sum().sqrt())


def legacy_score(region: torch.Tensor, *, color_weight: float = 0.5, gradient_weight: float = 0.5) -> float:
    """(w_c MAD + w_g mean Sobel magnitude) / (w_c + w_g) of a [3, h, w] region in [0, 1]."""
    region = region.to(torch.float32)
    mad = (region - region.mean(dim=(-2, -1), keepdim=True)).abs().mean()
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=region.device)
    kernels = torch.stack([sobel_x, sobel_x.T]).unsqueeze(1)  # (2, 1, 3, 3)
    padded = F.pad(region.unsqueeze(1), (1, 1, 1, 1), mode="replicate")  # (3, 1, h+2, w+2)
    grad = F.conv2d(padded, kernels)  # (3, 2, h, w)
    magnitude = grad.pow(2).sum(dim=1).sqrt().mean()
    return float((color_weight * mad + gradient_weight * magnitude) / (color_weight + gradient_weight))


def _halves(w: int, h: int, min_tile: int, align: int) -> tuple[int, int] | None:
    """(hw, hh) if upstream's size rules allow a split (both sides > min_tile, both halves >= min_tile
    and >= align, remainders multiples of align), else None."""
    hw, hh = (w // 2) // align * align, (h // 2) // align * align
    if w <= min_tile or h <= min_tile or min(hw, hh) < max(min_tile, align):
        return None
    if (w - hw) % align or (h - hh) % align:
        return None
    return hw, hh


def _settings(
    image: torch.Tensor,
    criterion: str,
    threshold: float | None,
    min_tile: int | None,
    max_depth: int | None,
    max_tile: int | None,
    align: int,
    color_weight: float,
    gradient_weight: float,
) -> tuple[float, int, int | None]:
    """(threshold, min_tile, max_depth) with None replaced by the criterion's defaults, all checked."""
    if criterion not in CRITERIA:
        raise ValueError(f"quadtree.criterion must be one of {CRITERIA}, got {criterion!r}")
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be [3, H, W], got {tuple(image.shape)}")
    default_threshold, default_min, default_depth = _DEFAULTS[criterion]
    threshold = default_threshold if threshold is None else threshold
    min_tile = default_min if min_tile is None else min_tile
    max_depth = default_depth if max_depth is None else max_depth
    if align < 1:
        raise ValueError(f"quadtree.align must be >= 1, got {align}")
    if min_tile < 0:
        raise ValueError(f"quadtree.min_tile must be >= 0, got {min_tile}")
    if max_tile is not None and max_tile < 2 * align:
        raise ValueError(f"quadtree.max_tile must be >= 2 x align = {2 * align}, got {max_tile}")
    if color_weight < 0 or gradient_weight < 0 or color_weight + gradient_weight <= 0:
        raise ValueError(
            f"legacy weights must be >= 0 with a positive sum, got {color_weight}, {gradient_weight}"
        )
    return threshold, min_tile, max_depth


def build_quadtree(
    image: torch.Tensor,
    *,
    threshold: float | None = None,
    min_tile: int | None = None,
    align: int = 8,
    criterion: Criterion = "variance",
    max_depth: int | None = None,
    max_tile: int | None = None,
    color_weight: float = 0.5,
    gradient_weight: float = 0.5,
) -> list[Leaf]:
    """Leaves of the quadtree of image [3, H, W] in [0, 1].

    A node splits into TL (hw, hh), TR (w-hw, hh), BL (hw, h-hh), BR (w-hw, h-hh) with
    hw = floor(w/2/align)*align, so odd multiples split unevenly (24 -> 8 + 16), iff its score
    exceeds the threshold ("variance": > 25 on the 0-255 RGB variation; "legacy": >= 0.03), both
    sides exceed min_tile, both halves are >= min_tile and the remainders are multiples of align,
    and its depth is below max_depth. None picks the criterion's default: variance (25.0, 64 px,
    no depth cap); legacy (0.03, 256 px, depth 4). A node wider or taller than max_tile (None: no
    cap) splits regardless of its score and depth, into halves of at least `align`.
    """
    threshold, min_tile, max_depth = _settings(
        image, criterion, threshold, min_tile, max_depth, max_tile, align, color_weight, gradient_weight
    )
    root_w, root_h = image.shape[-1] // align * align, image.shape[-2] // align * align
    if root_w == 0 or root_h == 0:
        raise ValueError(f"image {tuple(image.shape[-2:])} is smaller than align={align}")

    def score(r: Rect) -> float:
        region = r.cut(image)
        if criterion == "variance":
            return rgb_variation(region)
        return legacy_score(region, color_weight=color_weight, gradient_weight=gradient_weight)

    leaves: list[Leaf] = []

    def visit(r: Rect, depth: int) -> None:
        s = score(r)
        busy = s > threshold if criterion == "variance" else s >= threshold
        too_big = max_tile is not None and max(r.w, r.h) > max_tile
        halves = _halves(r.w, r.h, align if too_big else min_tile, align)
        if not too_big and max_depth is not None and depth >= max_depth:
            halves = None
        if not (busy or too_big) or halves is None:
            leaves.append(Leaf(r, depth, s))
            return
        hw, hh = halves
        visit(Rect(r.y0, r.x0, hh, hw), depth + 1)  # TL
        visit(Rect(r.y0, r.x0 + hw, hh, r.w - hw), depth + 1)  # TR
        visit(Rect(r.y0 + hh, r.x0, r.h - hh, hw), depth + 1)  # BL
        visit(Rect(r.y0 + hh, r.x0 + hw, r.h - hh, r.w - hw), depth + 1)  # BR

    visit(Rect(0, 0, root_h, root_w), 0)
    return leaves


def assign_denoise(leaves: Sequence[Leaf], d_min: float = 0.2, d_max: float = 0.8) -> list[Leaf]:
    """d = d_min + (d_max - d_min)(1 - area / area_max) per leaf: large flat leaves keep more of the input."""
    if not 0.0 <= d_min <= d_max <= 1.0:
        raise ValueError(
            f"denoise range must satisfy 0 <= d_min <= d_max <= 1, got d_min={d_min}, d_max={d_max}"
        )
    if not leaves:
        return []
    area_max = max(leaf.rect.area for leaf in leaves)
    return [
        dataclasses.replace(leaf, denoise=d_min + (d_max - d_min) * (1.0 - leaf.rect.area / area_max))
        for leaf in leaves
    ]


def leaves_to_json(leaves: Sequence[Leaf]) -> list[dict]:
    """JSON-ready leaf records of one image, in upstream's keys: x, y, w, h, depth, variance (the
    split score, whatever the criterion), denoise."""
    return [
        {
            "x": r.x0,
            "y": r.y0,
            "w": r.w,
            "h": r.h,
            "depth": leaf.depth,
            "variance": leaf.score,
            "denoise": leaf.denoise,
        }
        for leaf in leaves
        for r in (leaf.rect,)
    ]


def quadtree_tiles(
    leaves: Sequence[Leaf], latent_h: int, latent_w: int, *, overlap: int, scale: int = 8, align: int = 1
) -> list[Tile]:
    """Latent tiles of the leaves, index = leaf order.

    core = leaf / scale; o = min(overlap, floor(core_w/2), floor(core_h/2)) after clamping the
    global overlap to min(latent_h, latent_w) // 4, rounded down to a multiple of `align` (2 keeps
    tiles whole 2x2 Flux tokens when the leaves are multiples of 16 px); tile = core grown by o,
    clipped to the latent.
    """
    if overlap < 0:
        raise ValueError(f"tile.overlap must be >= 0, got {overlap}")
    overlap = min(overlap, min(latent_h, latent_w) // 4)
    tiles = []
    for i, leaf in enumerate(leaves):
        core = leaf.rect.scale(1, scale)  # raises unless the leaf lies on the latent grid
        if not core.inside(latent_h, latent_w):
            raise ValueError(f"leaf {leaf} lies outside the {latent_h}x{latent_w} latent at scale {scale}")
        o = min(overlap, core.w // 2, core.h // 2) // align * align
        tiles.append(Tile(core.grow(o, latent_h, latent_w), i))
    return tiles


def quadtree_overlay(image: torch.Tensor, leaves: Sequence[Leaf], *, alpha: float = 0.35) -> torch.Tensor:
    """The image [3, H, W] with each leaf tinted blue (denoise 0) to red (denoise 1) and a 1-px white border.

    Colours use the raw denoise (not rescaled to the leaves' range), so overlays of different images compare.
    """
    out = image.detach().to(torch.float32).clone()
    for leaf in leaves:
        d = min(max(leaf.denoise, 0.0), 1.0)
        tint = torch.tensor([d, 0.0, 1.0 - d], device=out.device).view(3, 1, 1)
        region = leaf.rect.cut(out)
        region.mul_(1.0 - alpha).add_(alpha * tint)
        region[:, 0, :] = 1.0
        region[:, -1, :] = 1.0
        region[:, :, 0] = 1.0
        region[:, :, -1] = 1.0
    return out.clamp_(0.0, 1.0).to(image.dtype)
