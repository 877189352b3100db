"""Configuration of the progressive upscale job (tasks/upscale.py): one frozen dataclass per concern.

Sizes a user writes are in image pixels; the task converts to latent pixels with the VAE's factor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from core.models.loading import ModelSpec
from core.rope.spec import RopeSpec
from core.upscale.resize import CovarianceResize
from core.upscale.skip_residual import SkipResidual, linear_values

RESIZE_MODES = ("pixel", "latent", "covariance")
RESIZE_METHODS = ("bicubic", "bilinear", "lanczos", "area", "nearest")
TILE_METHODS = ("none", "multidiffusion", "mixture", "spot")
LAYOUTS = ("grid", "quadtree")
NOISE_MODES = ("flow_consistent", "comfy_compat")
VAE_TILING = ("auto", "on", "off")


def _unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class QuadtreeConfig:
    """Quadtree tiles (algorithms.md §7): variance split, per-leaf denoise by relative area."""

    criterion: str = "variance"
    threshold: float | None = None  # None: the criterion's default (variance 25, legacy 0.03)
    min_tile: int | None = None  # pixels; leaves never get smaller. None: variance 64, legacy 256
    max_tile: int = 0  # pixels; larger leaves always split. 0: the model's native size
    denoise_min: float = 0.2  # relative to the phase denoise: large flat leaves keep more of the input
    denoise_max: float = 0.8
    variable_denoise: bool = True
    denoise_mode: str = "exact"  # exact per-tile start sigma with pinning; comfy_compat = upstream's blend
    skip_diffusion_below: int = 0  # pixels: leaves with a smaller side keep the input content

    def __post_init__(self) -> None:
        _choice("tiling.quadtree.criterion", self.criterion, ("variance", "legacy"))
        _choice("tiling.quadtree.denoise_mode", self.denoise_mode, ("exact", "comfy_compat"))
        _unit("tiling.quadtree.denoise_min", self.denoise_min)
        _unit("tiling.quadtree.denoise_max", self.denoise_max)
        if self.denoise_min > self.denoise_max:
            raise ValueError(
                f"tiling.quadtree.denoise_min ({self.denoise_min}) must be <= "
                f"denoise_max ({self.denoise_max})"
            )
        if self.min_tile is not None and (self.min_tile < 8 or self.min_tile % 8):
            raise ValueError(f"tiling.quadtree.min_tile must be a multiple of 8 >= 8, got {self.min_tile}")
        if self.max_tile < 0 or self.max_tile % 16 or 0 < self.max_tile < 32:
            raise ValueError(
                f"tiling.quadtree.max_tile must be 0 (native) or a multiple of 16 >= 32, got {self.max_tile}"
            )
        if self.skip_diffusion_below < 0:
            raise ValueError(
                f"tiling.quadtree.skip_diffusion_below must be >= 0, got {self.skip_diffusion_below}"
            )


@dataclass(frozen=True, kw_only=True)
class TilingConfig:
    """How each step's local views are cut (algorithms.md §6, §7).

    method: none (one full-frame view per step; DyPE extends RoPE when it exceeds the native size),
      multidiffusion (count average), mixture (Gaussian weights), spot (shifted non-overlapping grid).
    tile / overlap: pixels; 0 = the model's native size / a quarter of the tile.
    """

    method: str = "multidiffusion"
    layout: str = "grid"
    tile: int = 0
    overlap: int = -1
    spot_mode: str = "random"
    spot_wrap: bool = False
    quadtree: QuadtreeConfig = field(default_factory=QuadtreeConfig)

    def __post_init__(self) -> None:
        _choice("tiling.method", self.method, TILE_METHODS)
        _choice("tiling.layout", self.layout, LAYOUTS)
        _choice("tiling.spot_mode", self.spot_mode, ("random", "sorted", "fibonacci"))
        if self.tile < 0 or self.tile % 16:
            raise ValueError(f"tiling.tile must be 0 or a positive multiple of 16 pixels, got {self.tile}")
        if self.overlap < -1 or (self.overlap > 0 and self.overlap % 16):
            raise ValueError(
                f"tiling.overlap must be -1 (auto) or a multiple of 16 pixels, got {self.overlap}"
            )
        if self.tile and self.overlap > self.tile // 2:
            raise ValueError(f"tiling.overlap ({self.overlap}) must be at most half the tile ({self.tile})")
        if self.layout == "quadtree" and self.method == "none":
            raise ValueError("tiling.layout=quadtree needs a tiling.method (multidiffusion, mixture or spot)")
        if self.layout == "quadtree" and self.method == "spot" and self.quadtree.variable_denoise:
            raise ValueError("tiling.method=spot on quadtree tiles cannot use quadtree.variable_denoise")
        if self.layout == "quadtree" and self.method == "spot" and self.quadtree.skip_diffusion_below:
            raise ValueError(
                "tiling.quadtree.skip_diffusion_below needs fixed tiles; tiling.method=spot moves its "
                f"windows every step (got skip_diffusion_below={self.quadtree.skip_diffusion_below})"
            )


@dataclass(frozen=True, kw_only=True)
class CoherenceConfig:
    """Global paths (algorithms.md §3.2, §4.3).

    dilated: DemoFusion dilated sampling: s^2 sub-lattice views (s = factor, 0 = the smallest that
      brings a sub-lattice to the native size), fused with weight c2 = cos_f^cosine_scale_2.
    fft_blend: blend b of the downscaled refinement pass (0 = off), downscale factor, its denoise.
    """

    dilated: bool = True
    factor: int = 0
    blur_sigma: float = 1.0
    cosine_scale_2: float = 1.0
    cosine_scale_3: float = 1.0
    fft_blend: float = 0.0
    fft_factor: float = 2.0
    fft_denoise: float = 0.5
    fft_min_steps: int = 1
    fft_seed_mode: str = "derive"

    def __post_init__(self) -> None:
        if self.factor < 0:
            raise ValueError(f"coherence.factor must be >= 0, got {self.factor}")
        if self.blur_sigma < 0:
            raise ValueError(f"coherence.blur_sigma must be >= 0, got {self.blur_sigma}")
        _unit("coherence.fft_blend", self.fft_blend)
        if self.fft_factor < 1:
            raise ValueError(f"coherence.fft_factor must be >= 1, got {self.fft_factor}")
        if not 0 < self.fft_denoise <= 1:
            raise ValueError(f"coherence.fft_denoise must be in (0, 1], got {self.fft_denoise}")
        _choice("coherence.fft_seed_mode", self.fft_seed_mode, ("derive", "same"))


@dataclass(frozen=True, kw_only=True)
class CleanupConfig:
    """A final pass at the target size: no resize, no skip residual, no global path, low denoise."""

    enabled: bool = False
    denoise: float = 0.15
    steps: int = 20

    def __post_init__(self) -> None:
        _unit("cleanup.denoise", self.denoise)
        if self.steps < 1:
            raise ValueError(f"cleanup.steps must be >= 1, got {self.steps}")


@dataclass(frozen=True, kw_only=True)
class OutputsConfig:
    phase_images: bool = True
    previews: bool = False  # a latent-to-RGB preview PNG per step
    latent_stats: bool = True
    compare_bicubic: bool = True
    checkpoints: bool = True  # the latent at each phase boundary, for resume


@dataclass(frozen=True, kw_only=True)
class UpscaleConfig:
    """A progressive tiled upscale.

    image: input PNG/JPEG. mask: optional mask PNG (white = regenerate), resized with every phase.
    target: [height, width] in pixels, or scale (total) when target is [0, 0].
    phases: 0 = the fewest phases of at most max_scale each.
    steps: steps of each phase's FULL schedule; a phase runs its img2img suffix (denoise).
    denoise: [first, last] phase denoise, linear across phases (one value: all phases).
    mu: schedule shift; null = Flux's resolution rule clamped at 1.15 (algorithms.md §1).
    noise_mode: flow_consistent (noise once to the start sigma) or comfy_compat (the upstream
      double noising with `renoise`, kept for comparison).
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    image: str = ""
    mask: str = ""
    target: tuple[int, int] = (0, 0)
    scale: float = 0.0
    phases: int = 0
    max_scale: float = 2.0
    steps: int = 20
    denoise: tuple[float, ...] = (0.6, 0.4)
    mu: float | None = None
    resize: str = "pixel"
    resize_method: str = "bicubic"
    covariance: CovarianceResize = field(default_factory=CovarianceResize)
    noise_mode: str = "flow_consistent"
    renoise: tuple[float, float] = (0.35, 0.15)
    skip: bool = True
    skip_residual: SkipResidual = field(default_factory=SkipResidual)
    rewind: tuple[float, float] = (0.0, 0.0)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    coherence: CoherenceConfig = field(default_factory=CoherenceConfig)
    cleanup: CleanupConfig = field(default_factory=CleanupConfig)
    rope: RopeSpec = field(default_factory=lambda: RopeSpec(method="yarn"))
    vae_tiling: str = "auto"
    vae_tile: int = 512
    seed: int = 0
    outputs: OutputsConfig = field(default_factory=OutputsConfig)

    def __post_init__(self) -> None:
        if not self.image:
            raise ValueError("image is required (a PNG or JPEG path)")
        if len(self.target) != 2 or any(v < 0 for v in self.target):
            raise ValueError(f"target must be [height, width] >= 0, got {list(self.target)}")
        if (self.target == (0, 0)) == (self.scale == 0):
            raise ValueError(f"set exactly one of target ({list(self.target)}) and scale ({self.scale})")
        if any(v % 16 for v in self.target) and self.target != (0, 0) and min(self.target) < 16:
            raise ValueError(f"target must be at least 16 x 16 pixels, got {list(self.target)}")
        if self.scale and self.scale < 1:
            raise ValueError(f"scale must be >= 1 (Tessera upscales), got {self.scale}")
        if self.phases < 0:
            raise ValueError(f"phases must be >= 0, got {self.phases}")
        if self.max_scale <= 1:
            raise ValueError(f"max_scale must be > 1, got {self.max_scale}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not 1 <= len(self.denoise) <= 2:
            raise ValueError(f"denoise must be [first, last] or one value, got {list(self.denoise)}")
        for d in self.denoise:
            _unit("denoise", d)
        for r in self.renoise:
            _unit("renoise", r)
        if self.mu is not None and not 0 <= self.mu <= 5:
            raise ValueError(f"mu must be in [0, 5] or null, got {self.mu}")
        _choice("resize", self.resize, RESIZE_MODES)
        _choice("resize_method", self.resize_method, RESIZE_METHODS)
        _choice("noise_mode", self.noise_mode, NOISE_MODES)
        _choice("vae_tiling", self.vae_tiling, VAE_TILING)
        if len(self.rewind) != 2:
            raise ValueError(f"rewind must be [min, max], got {list(self.rewind)}")
        for r in self.rewind:
            _unit("rewind", r)
        if self.vae_tile < 64 or self.vae_tile % 64:
            raise ValueError(f"vae_tile must be a multiple of 64 pixels >= 64, got {self.vae_tile}")

    def phase_denoise(self, phases: int) -> list[float]:
        return linear_values(self.denoise[0], self.denoise[-1], phases)


def check(cfg: UpscaleConfig) -> None:
    """Filesystem checks before any work: inputs exist and are images of a usable size."""
    from PIL import Image

    for name in ("image", "mask"):
        path = getattr(cfg, name)
        if not path:
            continue
        if not Path(path).is_file():
            raise FileNotFoundError(f"{name} {path!r} does not exist")
        try:
            with Image.open(path) as im:
                width, height = im.size
        except OSError as err:
            raise ValueError(f"{name} {path!r} is not a readable image: {err}") from None
        if name == "image":
            if min(width, height) < 16:
                raise ValueError(f"image {path!r} is {width}x{height}; it must be at least 16 x 16 pixels")
            if cfg.target != (0, 0) and (cfg.target[0] < height or cfg.target[1] < width):
                raise ValueError(
                    f"target {list(cfg.target)} is smaller than the image ({height}x{width}) on one axis; "
                    "Tessera upscales"
                )
            image_size = (height, width)
        elif (height, width) != image_size:
            raise ValueError(
                f"mask {path!r} is {height}x{width}, the image is {image_size[0]}x{image_size[1]}"
            )
