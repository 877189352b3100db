"""Tiles, fusion weight maps and the weighted fusion of per-tile outputs (docs/upscale.md, "Tiles").

A tile is a rectangle of the latent in latent pixels plus its place in the fusion order. Per step
every tile's model output is fused with per-pixel weights normalised to sum to 1 (the closed form
of MultiDiffusion's least-squares fusion, arXiv 2302.08113), then one solver step runs on the
whole latent. With Euler, fusing velocities equals fusing stepped latents (the step is linear in
v), so the plans here fuse velocities.

Decisions:
- Grid windows follow DemoFusion's rule (arXiv 2311.16973): n = ceil((H - tile) / stride) + 1
  windows per axis, and the last window is shifted back to end at the far edge instead of padded.
- Mixture of Diffusers weights (arXiv 2302.02412) use symmetric midpoints ((w - 1)/2, (h - 1)/2)
  and var = 0.02; the original's h/2 midpoint and var = 0.01 leave edge pixels with weights below
  1e-6 (counted as uncovered) and are not offered.
- Weight maps are computed in float64 on the CPU and then cast, so they are identical on any device.
- Fusion accumulates in float32 in tile-index order whatever order the outputs arrived in, so the
  result does not depend on which worker finished first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from core.tiling.rect import Rect

COVERAGE_EPS = 1e-6  # a pixel whose summed tile weight is at most this counts as uncovered
FusionMethod = Literal["multidiffusion", "mixture"]
FUSION_METHODS: tuple[FusionMethod, ...] = ("multidiffusion", "mixture")


@dataclass(frozen=True)
class Tile:
    """A rectangle of the latent (latent pixels); `index` sets its place in the fusion order."""

    rect: Rect
    index: int


def _pair(tile: int | tuple[int, int]) -> tuple[int, int]:
    return (tile, tile) if isinstance(tile, int) else (int(tile[0]), int(tile[1]))


def _axis_origins(length: int, size: int, overlap: int) -> list[int]:
    """Window origins on one axis: stride size - overlap, the last one shifted back to end at the edge."""
    if length <= size:
        return [0]
    stride = size - overlap
    count = -(-(length - size) // stride) + 1  # ceil((length - size) / stride) + 1
    return [min(i * stride, length - size) for i in range(count)]


def grid_tiles(
    height: int, width: int, *, tile: int | tuple[int, int], overlap: int, align: int = 2
) -> list[Tile]:
    """Row-major overlapping grid covering a height x width latent (DemoFusion's window rule).

    tile: (h, w) or one int for both, clamped to the latent; overlap: shared pixels between
    neighbours, at most half the tile. Every size and origin is a multiple of `align` (2 = one Flux
    token), so the latent and the tile must be too.
    """
    th, tw = _pair(tile)
    if th < 1 or tw < 1:
        raise ValueError(f"tile must be >= 1, got {(th, tw)}")
    if overlap < 0:
        raise ValueError(f"tile.overlap must be >= 0, got {overlap}")
    if 2 * overlap > min(th, tw):
        raise ValueError(f"tile.overlap must be <= half the tile {(th, tw)}, got {overlap}")
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    for name, value in (
        ("height", height),
        ("width", width),
        ("tile", th),
        ("tile", tw),
        ("tile.overlap", overlap),
    ):
        if value % align:
            raise ValueError(f"{name} must be a multiple of align={align}, got {value}")
    th, tw = min(th, height), min(tw, width)
    ys = _axis_origins(height, th, overlap)
    xs = _axis_origins(width, tw, overlap)
    return [Tile(Rect(y, x, th, tw), i * len(xs) + j) for i, y in enumerate(ys) for j, x in enumerate(xs)]


def weight_map(
    h: int,
    w: int,
    method: FusionMethod,
    *,
    var: float = 0.02,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-pixel fusion weight [h, w] of one tile.

    multidiffusion: ones (a count average: MultiDiffusion with uniform W).
    mixture: g_y (x) g_x with g_x(x) = exp(-(x - (w-1)/2)^2 / (2 var w^2)) / sqrt(2 pi var), and
    likewise g_y with (h-1)/2 and h (Mixture of Diffusers, arXiv 2302.02412, symmetric midpoints).
    """
    if method not in FUSION_METHODS:
        raise ValueError(f"method must be one of {FUSION_METHODS}, got {method!r}")
    if h < 1 or w < 1:
        raise ValueError(f"weight map size must be >= 1, got h={h}, w={w}")
    if method == "multidiffusion":
        return torch.ones(h, w, device=device, dtype=dtype)
    if var <= 0:
        raise ValueError(f"var must be > 0, got {var}")

    def gauss(n: int) -> torch.Tensor:
        pos = torch.arange(n, dtype=torch.float64)
        return torch.exp(-((pos - (n - 1) / 2) ** 2) / (n * n * 2 * var)) / math.sqrt(2 * math.pi * var)

    return torch.outer(gauss(h), gauss(w)).to(device=device, dtype=dtype)


def tile_weights(tiles: Sequence[Tile], method: FusionMethod, *, var: float = 0.02) -> list[torch.Tensor]:
    """CPU float32 weight maps parallel to `tiles`; tiles of equal shape share one tensor."""
    cache: dict[tuple[int, int], torch.Tensor] = {}
    out = []
    for t in tiles:
        shape = (t.rect.h, t.rect.w)
        if shape not in cache:
            cache[shape] = weight_map(*shape, method, var=var)
        out.append(cache[shape])
    return out


def check_inside(tiles: Sequence[Tile], height: int, width: int) -> None:
    for t in tiles:
        if not t.rect.inside(height, width):
            raise ValueError(f"tile {t} lies outside the {height}x{width} latent")


def fuse_with_coverage(
    shape: Sequence[int],
    tiles: Sequence[Tile],
    outputs: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    *,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fused [1, C, H, W] float32, weight sum [H, W] float32) of per-tile outputs [C, h, w].

    fused = sum_i W_i * out_i / sum_i W_i per pixel (MultiDiffusion's closed form), 0 where no tile has
    weight. Accumulation runs in float32 in tile-index order on `device` (default: the outputs'
    device; give it when the list may be empty, e.g. a step where no tile is active).
    """
    _, channels, height, width = shape
    if not (len(tiles) == len(outputs) == len(weights)):
        raise ValueError(f"got {len(tiles)} tiles, {len(outputs)} outputs and {len(weights)} weight maps")
    check_inside(tiles, height, width)
    if device is None:
        device = outputs[0].device if outputs else torch.device("cpu")
    acc = torch.zeros(1, channels, height, width, device=device, dtype=torch.float32)
    wsum = torch.zeros(height, width, device=device, dtype=torch.float32)
    for i in sorted(range(len(tiles)), key=lambda i: tiles[i].index):
        r, out, w = tiles[i].rect, outputs[i], weights[i]
        if tuple(out.shape) != (channels, r.h, r.w) or tuple(w.shape) != (r.h, r.w):
            raise ValueError(
                f"tile {tiles[i].index}: output {tuple(out.shape)} and weights {tuple(w.shape)} "
                f"do not match tile ({channels}, {r.h}, {r.w})"
            )
        ys, xs = r.slices()
        w = w.to(device=device, dtype=torch.float32)
        acc[0, :, ys, xs] += out.to(device=device, dtype=torch.float32) * w
        wsum[ys, xs] += w
    fused = torch.where(wsum > 0, acc / wsum.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    return fused, wsum


def fuse_views(
    shape: Sequence[int],
    tiles: Sequence[Tile],
    outputs: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    *,
    require_coverage: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Weighted per-pixel average [1, C, H, W] of tile outputs, in the outputs' dtype.

    require_coverage: raise if any pixel's weight sum is <= 1e-6. Paths that leave pixels
    uncovered on purpose (per-tile start steps) pass False and get 0 there.
    """
    fused, wsum = fuse_with_coverage(shape, tiles, outputs, weights, device=device)
    if require_coverage:
        uncovered = wsum <= COVERAGE_EPS
        if bool(uncovered.any()):
            y, x = (int(v) for v in uncovered.nonzero()[0])
            raise ValueError(
                f"{int(uncovered.sum())} of {wsum.numel()} latent pixels have tile weight <= {COVERAGE_EPS} "
                f"(first at y={y}, x={x})"
            )
    dtype = outputs[0].dtype if outputs else torch.float32
    return fused.to(dtype)
