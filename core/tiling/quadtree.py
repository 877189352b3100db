"""Content-adaptive quadtree tiles (algorithms.md section 7; behaviour of rickyars/comfyui-quadtree-tile).

The tree is built in image pixels from the input image: busy regions are split into four, flat
ones stay large. Each leaf gets a denoise strength from its relative area (small busy leaves are
regenerated more), and becomes one latent tile grown by an overlap.

Decisions:
- Root = (0, 0, floor(W/8)*8, floor(H/8)*8), never the upstream power-of-two square that reached
  outside the image. Leaves are listed depth-first in TL, TR, BL, BR order.
- Built leaves carry denoise = 1.0 until `assign_denoise` sets it (section 7.2).
- "variance" defaults to a 64 px minimum leaf [ours], not upstream's 4 px: a leaf becomes a latent
  tile of leaf / 8 pixels, and below 64 px that is 4 x 4 Flux tokens, too little context to
  denoise. Upstream's split rule itself is unchanged (min_tile=4 reproduces it).
- `max_tile` caps the leaf size [ours]: a leaf wider or taller than it splits whatever its score
  (down to `align`, past max_depth), so flat regions never become views far beyond the model's
  native size. Upstream has no cap.
- "legacy" criterion: (w_c MAD + w_g mean Sobel magnitude) / (w_c + w_g) >= 0.03 on the [0, 1]
  image, depth < 4, halves >= 256 px. The Sobel filter sees the region with replicate padding
  [ours]: upstream zero-padded each region, so flat non-black regions scored edges at their border.
- `quadtree_tiles` returns QuadTile, a Tile with the leaf's denoise; skip_diffusion_below tiles get
  denoise 0 (the exact per-tile mode never runs them, section 7.4b).
- The builder works on one image; callers loop over a batch and keep one leaf list per item ([ours]).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from core.tiling.tiles import Tile

CRITERIA = ("variance", "legacy")
_DEFAULTS = {"variance": (25.0, 64, None), "legacy": (0.03, 256, 4)}  # threshold, min_tile, max_depth


@dataclass(frozen=True)
class Leaf:
    """A quadtree leaf in image pixels; variance is the split score of its criterion."""

    x: int
    y: int
    w: int
    h: int
    depth: int
    variance: float
    denoise: float = 1.0


@dataclass(frozen=True)
class QuadTile(Tile):
    """A latent tile from a quadtree leaf, with that leaf's denoise strength in [0, 1]."""

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
    """(hw, hh) if the section 7.1 size rules allow a split, else None."""
    hw, hh = (w // 2) // align * align, (h // 2) // align * align
    if w <= min_tile or h <= min_tile or min(hw, hh) < max(min_tile, align):
        return None
    if (w - hw) % align or (h - hh) % align:
        return None
    return hw, hh


def build_quadtree(
    image: torch.Tensor,
    *,
    threshold: float | None = None,
    min_tile: int | None = None,
    align: int = 8,
    criterion: str = "variance",
    max_depth: int | None = None,
    max_tile: int | None = None,
    color_weight: float = 0.5,
    gradient_weight: float = 0.5,
) -> list[Leaf]:
    """Leaves of the quadtree of image [3, H, W] in [0, 1] (section 7.1).

    A node splits into TL (hw, hh), TR (w-hw, hh), BL (hw, h-hh), BR (w-hw, h-hh) with
    hw = floor(w/2/align)*align, so odd multiples split unevenly (24 -> 8 + 16), iff its score
    exceeds the threshold ("variance": > 25 on the 0-255 RGB variation; "legacy": >= 0.03), both
    sides exceed min_tile, both halves are >= min_tile and the remainders are multiples of align,
    and its depth is below max_depth. None picks the criterion's default: variance (25.0, 64 px,
    no depth cap); legacy (0.03, 256 px, depth 4). A node wider or taller than max_tile (None: no
    cap) splits regardless of its score and depth, into halves of at least `align`.
    """
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
    root_w, root_h = image.shape[-1] // align * align, image.shape[-2] // align * align
    if root_w == 0 or root_h == 0:
        raise ValueError(f"image {tuple(image.shape[-2:])} is smaller than align={align}")

    def score(x: int, y: int, w: int, h: int) -> float:
        region = image[:, y : y + h, x : x + w]
        if criterion == "variance":
            return rgb_variation(region)
        return legacy_score(region, color_weight=color_weight, gradient_weight=gradient_weight)

    leaves: list[Leaf] = []

    def visit(x: int, y: int, w: int, h: int, depth: int) -> None:
        s = score(x, y, w, h)
        busy = s > threshold if criterion == "variance" else s >= threshold
        too_big = max_tile is not None and max(w, h) > max_tile
        halves = _halves(w, h, align, align) if too_big else _halves(w, h, min_tile, align)
        if not too_big and max_depth is not None and depth >= max_depth:
            halves = None
        if not (busy or too_big) or halves is None:
            leaves.append(Leaf(x=x, y=y, w=w, h=h, depth=depth, variance=s))
            return
        hw, hh = halves
        visit(x, y, hw, hh, depth + 1)  # TL
        visit(x + hw, y, w - hw, hh, depth + 1)  # TR
        visit(x, y + hh, hw, h - hh, depth + 1)  # BL
        visit(x + hw, y + hh, w - hw, h - hh, depth + 1)  # BR

    visit(0, 0, root_w, root_h, 0)
    return leaves


def assign_denoise(leaves: Sequence[Leaf], d_min: float = 0.2, d_max: float = 0.8) -> list[Leaf]:
    """d = d_min + (d_max - d_min)(1 - area / area_max) per leaf (section 7.2)."""
    if not 0.0 <= d_min <= d_max <= 1.0:
        raise ValueError(
            f"denoise range must satisfy 0 <= d_min <= d_max <= 1, got d_min={d_min}, d_max={d_max}"
        )
    if not leaves:
        return []
    area_max = max(leaf.w * leaf.h for leaf in leaves)
    return [
        dataclasses.replace(leaf, denoise=d_min + (d_max - d_min) * (1.0 - leaf.w * leaf.h / area_max))
        for leaf in leaves
    ]


def leaves_to_json(leaves: Sequence[Leaf]) -> list[dict]:
    """JSON-ready leaf records (x, y, w, h, depth, variance, denoise) of one image."""
    return [dataclasses.asdict(leaf) for leaf in leaves]


def leaves_from_json(records: Sequence[dict]) -> list[Leaf]:
    """Inverse of leaves_to_json."""
    return [
        Leaf(
            x=int(r["x"]),
            y=int(r["y"]),
            w=int(r["w"]),
            h=int(r["h"]),
            depth=int(r["depth"]),
            variance=float(r["variance"]),
            denoise=float(r["denoise"]),
        )
        for r in records
    ]


def quadtree_tiles(
    leaves: Sequence[Leaf],
    latent_h: int,
    latent_w: int,
    *,
    overlap: int,
    scale: int = 8,
    skip_diffusion_below: int = 0,
    align: int = 1,
) -> list[QuadTile]:
    """Latent tiles of the leaves (section 7.3), index = leaf order.

    core = leaf / scale; o = min(overlap, floor(core_w/2), floor(core_h/2)) after clamping the
    global overlap to min(latent_h, latent_w) // 4, rounded down to a multiple of `align` (2 keeps
    tiles whole 2x2 Flux tokens when the leaves are multiples of 16 px); bbox = core grown by o,
    clipped to the latent. Leaves with min(w, h) < skip_diffusion_below image pixels get denoise 0.
    """
    if overlap < 0:
        raise ValueError(f"tile.overlap must be >= 0, got {overlap}")
    overlap = min(overlap, min(latent_h, latent_w) // 4)
    tiles = []
    for i, leaf in enumerate(leaves):
        if any(v % scale for v in (leaf.x, leaf.y, leaf.w, leaf.h)):
            raise ValueError(f"leaf {leaf} is not aligned to scale={scale}")
        cx, cy, cw, ch = leaf.x // scale, leaf.y // scale, leaf.w // scale, leaf.h // scale
        if cy + ch > latent_h or cx + cw > latent_w:
            raise ValueError(f"leaf {leaf} lies outside the {latent_h}x{latent_w} latent at scale {scale}")
        o = min(overlap, cw // 2, ch // 2) // align * align
        y0, x0 = max(0, cy - o), max(0, cx - o)
        y1, x1 = min(latent_h, cy + ch + o), min(latent_w, cx + cw + o)
        denoise = 0.0 if min(leaf.w, leaf.h) < skip_diffusion_below else leaf.denoise
        tiles.append(QuadTile(y0, x0, y1 - y0, x1 - x0, i, denoise))
    return tiles


def quadtree_overlay(image: torch.Tensor, leaves: Sequence[Leaf], *, alpha: float = 0.35) -> torch.Tensor:
    """The image [3, H, W] with each leaf tinted blue (denoise 0) to red (denoise 1) and a 1-px white border.

    Colours use the raw denoise (not rescaled to the leaves' range), so overlays of different images compare.
    """
    out = image.detach().to(torch.float32).clone()
    for leaf in leaves:
        d = min(max(leaf.denoise, 0.0), 1.0)
        tint = torch.tensor([d, 0.0, 1.0 - d], device=out.device).view(3, 1, 1)
        region = out[:, leaf.y : leaf.y + leaf.h, leaf.x : leaf.x + leaf.w]
        region.mul_(1.0 - alpha).add_(alpha * tint)
        region[:, 0, :] = 1.0
        region[:, -1, :] = 1.0
        region[:, :, 0] = 1.0
        region[:, :, -1] = 1.0
    return out.clamp_(0.0, 1.0).to(image.dtype)
