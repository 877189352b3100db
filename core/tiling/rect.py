"""Rect: the one rectangle type of the project (latent tiles, quadtree leaves, VAE tile cores and
windows). Rows [y0, y0 + h), columns [x0, x0 + w), in pixels of whatever grid the caller names
(image pixels, latent pixels or tokens)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Rect:
    y0: int
    x0: int
    h: int
    w: int

    def __post_init__(self) -> None:
        if self.y0 < 0 or self.x0 < 0:
            raise ValueError(f"rect origin must be >= 0, got ({self.y0}, {self.x0})")
        if self.h < 1 or self.w < 1:
            raise ValueError(f"rect size must be >= 1, got ({self.h}, {self.w})")

    @property
    def y1(self) -> int:
        return self.y0 + self.h

    @property
    def x1(self) -> int:
        return self.x0 + self.w

    @property
    def area(self) -> int:
        return self.h * self.w

    def slices(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    def scale(self, num: int, den: int = 1) -> Rect:
        """The same region at a resolution num/den times this one; every edge must land on a pixel."""
        edges = [self.y0, self.x0, self.h, self.w]
        if any(e * num % den for e in edges):
            raise ValueError(f"rect {self} does not scale by {num}/{den} onto whole pixels")
        return Rect(*(e * num // den for e in edges))

    def cut(self, x: torch.Tensor) -> torch.Tensor:
        """x[..., rows, cols] of this rect (a view)."""
        return x[..., self.y0 : self.y1, self.x0 : self.x1]

    def grow(self, margin: int, height: int, width: int) -> Rect:
        """This rect grown by `margin` on every side, clipped to [0, height) x [0, width)."""
        y0, x0 = max(0, self.y0 - margin), max(0, self.x0 - margin)
        return Rect(y0, x0, min(height, self.y1 + margin) - y0, min(width, self.x1 + margin) - x0)

    def inside(self, height: int, width: int) -> bool:
        return self.y1 <= height and self.x1 <= width

    def as_list(self) -> list[int]:
        """[y0, x0, h, w], the form job records use."""
        return [self.y0, self.x0, self.h, self.w]
