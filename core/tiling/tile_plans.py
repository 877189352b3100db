"""Fused tiling plans: MultiDiffusion, Mixture of Diffusers, per-tile denoise and SpotDiffusion.

Each plan implements core.tiling.views.Plan: `views` cuts the tiles of one step out of the latent
x [1, C, H, W], and `fuse` merges the model's velocities [C, h, w] into one velocity [1, C, H, W]
(MultiDiffusion, arXiv 2302.08113; Mixture of Diffusers, arXiv 2302.02412). The sampler stays a
plain Euler loop around them. docs/upscale.md explains each decision below.

Decisions:
- Per-tile denoise is exact: tile i starts at step s_i = img2img_start(N, d_i) (the same rule as a
  plain img2img pass, core.flow.schedules), and before that its pixels are pinned to the inversion
  trajectory z'_sigma = (1 - sigma) u + sigma eps by the sampler through `pin_to_reference`. With
  one shared eps this makes each tile's pass an img2img pass at its own strength, consistent across
  overlaps. Pixels no active tile covers have activity 0 and stay pinned.
- `compat_denoise` reproduces the comfyui-quadtree-tile blend for comparison only, img2img form:
  it mixes the displacement (orig - x_in) into an x0 estimate, which is wrong for flow models
  (the "film negative" tiles). The txt2img scale form (x0 shrunk toward 0) is not implemented.
- Spot shifts (SpotDiffusion, arXiv 2407.15507) are drawn per (seed, "spot", axis, step) from keyed
  CPU generators, the two axes keyed apart (upstream seeds both alike, which correlates them), in
  steps of `align` latent pixels (align=1 gives upstream's U{0, tile-1}). The one-axis-per-step
  rule follows upstream: with both shifts nonzero, the rows move iff (step even) == (tile_h >
  tile_w), else the columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from core.flow.schedules import velocity_from_x0, x0_from_velocity
from core.flow.seeds import cpu_generator, derive_seed
from core.rope.spec import RopeSpec
from core.tiling.rect import Rect
from core.tiling.tiles import FusionMethod, Tile, check_inside, fuse_views, grid_tiles, tile_weights
from core.tiling.views import ViewInput

SpotMode = Literal["random", "sorted", "fibonacci"]
SPOT_MODES: tuple[SpotMode, ...] = ("random", "sorted", "fibonacci")


def pin_to_reference(x_next: torch.Tensor, activity: torch.Tensor, z_ref_next: torch.Tensor) -> torch.Tensor:
    """x_{k+1} = A_k * x_next + (1 - A_k) * z_ref_{k+1}, activity (or a mask) [H, W] in [0, 1].

    Written as two products rather than a lerp so that A = 0 gives z_ref and A = 1 gives x_next exactly.
    """
    a = activity.to(device=x_next.device, dtype=torch.float32)
    out = a * x_next.to(torch.float32) + (1.0 - a) * z_ref_next.to(device=x_next.device, dtype=torch.float32)
    return out.to(x_next.dtype)


def _check_latent(x: torch.Tensor, height: int, width: int) -> None:
    if x.ndim != 4 or x.shape[0] != 1 or tuple(x.shape[-2:]) != (height, width):
        raise ValueError(f"plan expects a latent [1, C, {height}, {width}], got {tuple(x.shape)}")


def _view(x: torch.Tensor, tile: Tile, sigma: float, rope: RopeSpec | None) -> ViewInput:
    # A copy with its own storage, so shipping a view never pickles the whole latent.
    return ViewInput(tile.rect.cut(x[0]).clone(memory_format=torch.contiguous_format), sigma, rope)


class TilePlan:
    """Fused tiles with optional per-tile start steps (MultiDiffusion / Mixture of Diffusers).

    tiles: fixed tiles inside a height x width latent (default: the tiles' extent).
    start_index: tile i is active at step k iff k >= start_index[i] (default: all active from 0);
        inactive tiles are not evaluated, and `fuse` renormalises over the active ones.
    compat_denoise, sigmas, reference: the upstream per-tile blend (module docstring), needing the full
        schedule (for the progress p) and the reference latent orig [1, C, H, W].
    """

    def __init__(
        self,
        tiles: Sequence[Tile],
        *,
        method: FusionMethod = "multidiffusion",
        start_index: Sequence[int] | None = None,
        compat_denoise: Sequence[float] | None = None,
        sigmas: Sequence[float] | None = None,
        reference: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        rope: RopeSpec | None = None,
    ) -> None:
        if not tiles:
            raise ValueError("tiles must not be empty")
        self.tiles = list(tiles)
        self.height = max(t.rect.y1 for t in self.tiles) if height is None else height
        self.width = max(t.rect.x1 for t in self.tiles) if width is None else width
        check_inside(self.tiles, self.height, self.width)
        self.method, self.rope = method, rope
        self.weights = tile_weights(self.tiles, method)
        if start_index is not None:
            if len(start_index) != len(self.tiles) or any(s < 0 for s in start_index):
                raise ValueError(
                    f"start_index must hold {len(self.tiles)} values >= 0, got {list(start_index)}"
                )
            start_index = [int(s) for s in start_index]
        self.start_index = start_index
        self.compat_denoise = None if compat_denoise is None else [float(d) for d in compat_denoise]
        self.sigmas = None if sigmas is None else torch.tensor(list(sigmas), dtype=torch.float64)
        self.reference = reference
        if self.compat_denoise is not None:
            if len(self.compat_denoise) != len(self.tiles) or not all(
                0 <= d <= 1 for d in self.compat_denoise
            ):
                raise ValueError(f"compat_denoise must hold {len(self.tiles)} values in [0, 1]")
            if self.sigmas is None or len(self.sigmas) < 2:
                raise ValueError("compat_denoise needs the full schedule `sigmas` (>= 2 values)")
            if reference is None:
                raise ValueError("compat_denoise needs the reference latent `reference`")
            _check_latent(reference, self.height, self.width)
        total = torch.zeros(self.height, self.width)
        for t, w in zip(self.tiles, self.weights, strict=True):
            total[t.rect.slices()] += w
        self._weight_sum = total

    def active(self, step: int) -> list[int]:
        """Indices (into tiles) of the tiles evaluated at this step."""
        if self.start_index is None:
            return list(range(len(self.tiles)))
        return [i for i, s in enumerate(self.start_index) if step >= s]

    def activity(self, step: int) -> torch.Tensor:
        """A_k [H, W] float32: weighted fraction of the tiles covering a pixel that are active (0 if none)."""
        act = torch.zeros(self.height, self.width)
        for i in self.active(step):
            act[self.tiles[i].rect.slices()] += self.weights[i]
        return torch.where(self._weight_sum > 0, act / self._weight_sum.clamp_min(1e-30), 0.0)

    def views(self, x: torch.Tensor, sigma: float, step: int) -> list[ViewInput]:
        _check_latent(x, self.height, self.width)
        return [_view(x, self.tiles[i], sigma, self.rope) for i in self.active(step)]

    def fuse(self, x: torch.Tensor, outputs: Sequence[torch.Tensor], sigma: float, step: int) -> torch.Tensor:
        _check_latent(x, self.height, self.width)
        active = self.active(step)
        if len(outputs) != len(active):
            raise ValueError(f"step {step}: {len(active)} active tiles but {len(outputs)} outputs")
        outputs = list(outputs)
        if self.compat_denoise is not None:
            outputs = [self._compat_velocity(x, i, v, sigma) for i, v in zip(active, outputs, strict=True)]
        fused = fuse_views(
            x.shape,
            [self.tiles[i] for i in active],
            outputs,
            [self.weights[i] for i in active],
            require_coverage=self.start_index is None,
            device=x.device,
        )
        return fused.to(x.dtype)

    def _compat_velocity(self, x: torch.Tensor, i: int, v: torch.Tensor, sigma: float) -> torch.Tensor:
        """Upstream's blend [parity, wrong for flow models]: x0 <- beta x0 + (1 - beta)(orig - x_in)."""
        assert self.sigmas is not None and self.reference is not None and self.compat_denoise is not None
        if sigma <= 0:
            raise ValueError(f"compat_denoise needs sigma > 0 to convert x0 back to a velocity, got {sigma}")
        idx = int((self.sigmas - sigma).abs().argmin())
        progress = idx / (len(self.sigmas) - 1)
        d = self.compat_denoise[i]
        beta = min(max(d + (1.0 - d) * progress, 0.0), 1.0)
        x_in = self.tiles[i].rect.cut(x[0]).to(torch.float32)
        orig = self.tiles[i].rect.cut(self.reference[0]).to(device=x_in.device, dtype=torch.float32)
        x0 = x0_from_velocity(x_in, sigma, v.to(torch.float32))
        x0 = beta * x0 + (1.0 - beta) * (orig - x_in)
        return velocity_from_x0(x_in, sigma, x0).to(v.dtype)


def fibonacci_spacing(values: Sequence[int]) -> list[int]:
    """Upstream's "fibonacci" order: value i goes to slot F[i mod len F] mod n, probing on to a free slot.

    F = 0, 1, 1, 2, 3, 5, ... extended until its last term reaches n = len(values).
    """
    n = len(values)
    fib = [0, 1]
    while fib[-1] < n:
        fib.append(fib[-1] + fib[-2])
    out: list[int | None] = [None] * n
    for i, value in enumerate(values):
        slot = fib[i % len(fib)] % n
        while out[slot] is not None:
            slot = (slot + 1) % n
        out[slot] = value
    return out  # type: ignore[return-value]


class SpotPlan:
    """SpotDiffusion (arXiv 2407.15507): non-overlapping windows whose grid moves every step.

    wrap=True rolls x circularly by the step's shift, runs `tiles` (default: a stride = tile grid)
    and rolls the fused output back (upstream behaviour; it joins opposite borders in one window).
    wrap=False (default) moves the grid itself: windows at -shift + j * tile, clipped to the latent,
    so edge windows are partial and nothing wraps. `tiles` (e.g. quadtree tiles) needs wrap=True.
    mode "sorted" / "fibonacci" reorder the shifts of all `steps` steps, so they need `steps`.
    """

    def __init__(
        self,
        height: int,
        width: int,
        *,
        tile: int | tuple[int, int],
        seed: int,
        mode: SpotMode = "random",
        wrap: bool = False,
        tiles: Sequence[Tile] | None = None,
        method: FusionMethod = "multidiffusion",
        rope: RopeSpec | None = None,
        steps: int | None = None,
        align: int = 2,
    ) -> None:
        if mode not in SPOT_MODES:
            raise ValueError(f"spot.mode must be one of {SPOT_MODES}, got {mode!r}")
        if mode != "random" and (steps is None or steps < 1):
            raise ValueError(f"spot.mode={mode!r} needs steps >= 1, got {steps}")
        if tiles is not None and not wrap:
            raise ValueError("spot with given tiles shifts them by rolling the latent: set wrap=True")
        self.th, self.tw = (tile, tile) if isinstance(tile, int) else (int(tile[0]), int(tile[1]))
        self.grid = grid_tiles(height, width, tile=(self.th, self.tw), overlap=0, align=align)
        self.tiles = list(tiles) if tiles is not None else self.grid
        check_inside(self.tiles, height, width)
        self.height, self.width, self.seed, self.mode = height, width, seed, mode
        self.wrap, self.method, self.rope, self.steps, self.align = wrap, method, rope, steps, align
        self.weights = tile_weights(self.tiles, method)

    def _draw(self, axis: str, step: int) -> int:
        size = self.th if axis == "h" else self.tw
        choices = max(1, size // self.align)
        gen = cpu_generator(derive_seed(self.seed, "spot", axis, step))
        return int(torch.randint(0, choices, (1,), generator=gen)) * self.align

    def _axis_shift(self, axis: str, step: int) -> int:
        size, length = (self.th, self.height) if axis == "h" else (self.tw, self.width)
        if size >= length:  # one window covers the axis: nothing to move
            return 0
        if self.mode == "random":
            return self._draw(axis, step)
        assert self.steps is not None
        if not 0 <= step < self.steps:
            raise ValueError(f"step must be in [0, {self.steps}), got {step}")
        ordered = sorted(self._draw(axis, k) for k in range(self.steps))
        if self.mode == "fibonacci":
            ordered = fibonacci_spacing(ordered)
        return ordered[step]

    def shift(self, step: int) -> tuple[int, int]:
        """(dy, dx) of this step after the one-axis rule; a pure function of (seed, step[, steps])."""
        dy, dx = self._axis_shift("h", step), self._axis_shift("w", step)
        if dy and dx:
            if (step % 2 == 0) == (self.th > self.tw):
                dx = 0
            else:
                dy = 0
        return dy, dx

    def tiles_at(self, step: int) -> list[Tile]:
        """This step's windows: the fixed tiles (wrap=True, in rolled coordinates) or the offset grid."""
        if self.wrap:
            return self.tiles
        dy, dx = self.shift(step)

        def spans(length: int, size: int, offset: int) -> list[tuple[int, int]]:
            starts = range(-offset, length, size)
            return [(max(0, s), min(length, s + size)) for s in starts if min(length, s + size) > max(0, s)]

        rows, cols = spans(self.height, self.th, dy), spans(self.width, self.tw, dx)
        return [
            Tile(Rect(y0, x0, y1 - y0, x1 - x0), i * len(cols) + j)
            for i, (y0, y1) in enumerate(rows)
            for j, (x0, x1) in enumerate(cols)
        ]

    def views(self, x: torch.Tensor, sigma: float, step: int) -> list[ViewInput]:
        _check_latent(x, self.height, self.width)
        if self.wrap:
            x = torch.roll(x, shifts=self.shift(step), dims=(-2, -1))
        return [_view(x, t, sigma, self.rope) for t in self.tiles_at(step)]

    def fuse(self, x: torch.Tensor, outputs: Sequence[torch.Tensor], sigma: float, step: int) -> torch.Tensor:
        _check_latent(x, self.height, self.width)
        tiles = self.tiles_at(step)
        weights = self.weights if self.wrap else tile_weights(tiles, self.method)
        fused = fuse_views(x.shape, tiles, outputs, weights, device=x.device).to(x.dtype)
        if self.wrap:
            dy, dx = self.shift(step)
            fused = torch.roll(fused, shifts=(-dy, -dx), dims=(-2, -1))
        return fused
