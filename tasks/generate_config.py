"""Configuration of generation from noise (tasks/generate.py): the model, the size, seeds and steps."""

from __future__ import annotations

from dataclasses import dataclass, field

from core.models.loading import ModelSpec
from core.rope.spec import RopeSpec
from tasks.distill_attention import AttentionConfig

AUTO = "auto"
AUTO_VAE_TILE = 512  # pixels: vae_tile "auto" tiles images larger than this, in tiles of this size
SIZE_MULTIPLE = 16  # pixels: whole 2 x 2 tokens of an 8x VAE


@dataclass(frozen=True, kw_only=True)
class GenerateConfig:
    """Images generated from noise, one per seed, in one full-frame view per step.

    size: [height, width] in pixels, multiples of 16; [0, 0] = the model's native size.
    seeds: one image per seed (the start noise is keyed by the seed alone: core/flow/generation.py).
    steps: Euler steps from sigma 1 to 0; mu: the schedule shift (null: Flux's rule for the size).
    rope: how views larger than the native size extend RoPE (DyPE; plain RoPE within native).
    vae_tile: pixels per VAE decode tile; 0 = one pass, auto = 512 px tiles above 512 px.
    attention: serve a students bundle's ready layers (tasks/distill_attention.py); null = teacher.
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    size: tuple[int, int] = (0, 0)
    seeds: tuple[int, ...] = (0,)
    steps: int = 20
    mu: float | None = None
    rope: RopeSpec = field(default_factory=lambda: RopeSpec(method="yarn"))
    vae_tile: int | str = AUTO
    attention: AttentionConfig | None = None

    def __post_init__(self) -> None:
        if len(self.size) != 2 or any(v < 0 or v % SIZE_MULTIPLE for v in self.size):
            raise ValueError(
                f"size must be [height, width], multiples of {SIZE_MULTIPLE} px, got {list(self.size)}"
            )
        if (self.size[0] == 0) != (self.size[1] == 0):
            raise ValueError(f"size must be [0, 0] (native) or both sides > 0, got {list(self.size)}")
        if not self.seeds:
            raise ValueError("seeds must list at least one seed, got []")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {list(self.seeds)}")
        if any(s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be >= 0, got {list(self.seeds)}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.mu is not None and not 0 <= self.mu <= 5:
            raise ValueError(f"mu must be in [0, 5] or null, got {self.mu}")
        if isinstance(self.vae_tile, bool) or not (
            self.vae_tile == AUTO
            or (isinstance(self.vae_tile, int) and self.vae_tile >= 0 and self.vae_tile % 64 == 0)
        ):
            raise ValueError(
                f"vae_tile must be 0 (untiled), auto or a multiple of 64 pixels, got {self.vae_tile!r}"
            )

    @property
    def seed(self) -> int:
        """The first seed (job.json's `seed`)."""
        return self.seeds[0]

    def pixel_size(self, native_px: int) -> tuple[int, int]:
        return (native_px, native_px) if self.size == (0, 0) else (int(self.size[0]), int(self.size[1]))

    def vae_tile_px(self, height: int, width: int) -> int:
        if self.vae_tile == AUTO:
            return AUTO_VAE_TILE if max(height, width) > AUTO_VAE_TILE else 0
        return int(self.vae_tile)
