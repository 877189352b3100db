"""Configuration of the progressive upscale job (tasks/upscale.py): one frozen dataclass per concern.

Sizes a user writes are in image pixels; the task converts to latent pixels with the VAE's factor.
Every list of choices is owned by the component that implements it (core/, or here where the task
itself implements it) and only reused here; choice fields are plain strings checked against those
tuples, so a bad value gets an error that names the field, the value and the choices.
docs/upscale.md explains each knob and the method behind it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from core.models.loading import ModelSpec
from core.rope.spec import RopeSpec
from core.tiling.quadtree import CRITERIA
from core.tiling.tile_plans import SPOT_MODES
from core.tiling.tiles import FUSION_METHODS
from core.upscale.resize import METHODS as RESIZE_METHODS
from core.upscale.resize import CovarianceResize
from core.upscale.skip_residual import SkipResidual, linear_values
from tasks.distill_attention import AttentionConfig

TileMethod = Literal["none", "multidiffusion", "mixture", "spot"]
TILE_METHODS: tuple[TileMethod, ...] = ("none", *FUSION_METHODS, "spot")  # "none": one full-frame view
Layout = Literal["grid", "quadtree"]
LAYOUTS: tuple[Layout, ...] = ("grid", "quadtree")
ResizeMode = Literal["pixel", "latent", "covariance"]
RESIZE_MODES: tuple[ResizeMode, ...] = ("pixel", "latent", "covariance")
NoiseMode = Literal["flow_consistent", "comfy_compat"]
NOISE_MODES: tuple[NoiseMode, ...] = ("flow_consistent", "comfy_compat")
DenoiseMode = Literal["exact", "comfy_compat"]
DENOISE_MODES: tuple[DenoiseMode, ...] = ("exact", "comfy_compat")
AUTO = "auto"
AUTO_VAE_TILE = 512  # pixels: vae_tile "auto" tiles images larger than this, in tiles of this size


def _unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class QuadtreeConfig:
    """Quadtree tiles (comfyui-quadtree-tile): variance split, per-leaf denoise by relative area.

    threshold, min_tile: None = the criterion's own defaults (variance 25 and 64 px, legacy 0.03 and
      256 px; core.tiling.quadtree). max_tile: larger leaves always split; 0 = the model's native size.
    denoise_min, denoise_max: each leaf's denoise is d_min + (d_max - d_min)(1 - area / area_max),
      used as it is by the tiles of a progressive phase when variable_denoise is on (the phase
      denoise then does not apply); clean-up phases run all tiles at cleanup.denoise.
    denoise_mode: exact per-tile start sigma with pinning; comfy_compat = upstream's x0 blend.
    skip_diffusion_below: pixels; leaves with a shorter side keep the input content, in every mode.
    """

    criterion: str = "variance"  # core.tiling.quadtree.CRITERIA
    threshold: float | None = None
    min_tile: int | None = None
    max_tile: int = 0
    denoise_min: float = 0.2
    denoise_max: float = 0.8
    variable_denoise: bool = True
    denoise_mode: str = "exact"  # DENOISE_MODES
    skip_diffusion_below: int = 0

    def __post_init__(self) -> None:
        _choice("tiling.quadtree.criterion", self.criterion, CRITERIA)
        _choice("tiling.quadtree.denoise_mode", self.denoise_mode, DENOISE_MODES)
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
    """How each step's local views are cut.

    method: none (one full-frame view per step; DyPE extends RoPE beyond the native size),
      multidiffusion (count average), mixture (Gaussian weights), spot (shifted non-overlapping grid).
    tile / overlap: pixels; 0 = the model's native size / -1 = a quarter of the tile.
    """

    method: str = "multidiffusion"  # TILE_METHODS
    layout: str = "grid"  # LAYOUTS
    tile: int = 0
    overlap: int = -1
    spot_mode: str = "random"  # core.tiling.tile_plans.SPOT_MODES
    spot_wrap: bool = False
    quadtree: QuadtreeConfig = field(default_factory=QuadtreeConfig)

    def __post_init__(self) -> None:
        _choice("tiling.method", self.method, TILE_METHODS)
        _choice("tiling.layout", self.layout, LAYOUTS)
        _choice("tiling.spot_mode", self.spot_mode, SPOT_MODES)
        if self.tile < 0 or self.tile % 16:
            raise ValueError(f"tiling.tile must be 0 or a positive multiple of 16 pixels, got {self.tile}")
        if self.overlap < -1 or (self.overlap > 0 and self.overlap % 16):
            raise ValueError(
                f"tiling.overlap must be -1 (auto) or a multiple of 16 pixels, got {self.overlap}"
            )
        if self.tile and self.overlap > self.tile // 2:
            raise ValueError(f"tiling.overlap ({self.overlap}) must be at most half the tile ({self.tile})")
        if self.layout != "quadtree":
            return
        if self.method == "none":
            raise ValueError("tiling.layout=quadtree needs a tiling.method (multidiffusion, mixture or spot)")
        if self.method == "spot" and self.quadtree.variable_denoise:
            raise ValueError("tiling.method=spot on quadtree tiles cannot use quadtree.variable_denoise")
        if self.method == "spot" and self.quadtree.skip_diffusion_below:
            raise ValueError(
                "tiling.quadtree.skip_diffusion_below needs fixed tiles; tiling.method=spot moves its "
                f"windows every step (got skip_diffusion_below={self.quadtree.skip_diffusion_below})"
            )


@dataclass(frozen=True, kw_only=True)
class CoherenceConfig:
    """Global paths: DemoFusion's dilated views and the Upscaler's FFT low-pass refinement.

    dilated: 0 = off; "auto" = the smallest factor s that brings an s x s sub-lattice to the native
      size (off when that is 1); an integer s >= 2 = that factor. Views are fused with c2 = cos_f.
    blur_sigma: the Gaussian blur of the dilated views at sigma = 1 (it fades with c3).
    fft_blend: blend b of the downscaled refinement pass (0 = off); fft_factor: its downscale f;
      fft_denoise: its img2img strength d (it runs max(1, steps // 2) steps from there).
    """

    dilated: int | str = AUTO
    blur_sigma: float = 1.0
    fft_blend: float = 0.0
    fft_factor: float = 2.0
    fft_denoise: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.dilated, bool) or not (
            self.dilated == AUTO
            or (isinstance(self.dilated, int) and (self.dilated == 0 or self.dilated >= 2))
        ):
            raise ValueError(
                f"coherence.dilated must be 0 (off), auto or a factor >= 2, got {self.dilated!r}"
            )
        if self.blur_sigma < 0:
            raise ValueError(f"coherence.blur_sigma must be >= 0, got {self.blur_sigma}")
        _unit("coherence.fft_blend", self.fft_blend)
        if self.fft_factor < 1:
            raise ValueError(f"coherence.fft_factor must be >= 1, got {self.fft_factor}")
        if not 0 < self.fft_denoise <= 1:
            raise ValueError(f"coherence.fft_denoise must be in (0, 1], got {self.fft_denoise}")


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
    """Artifacts beside result.png; none of them changes the result (nor the resume fingerprint).

    reference: optional image to measure the result against (e.g. the original that a downscaled
      input was made from), at the target size: comparison.png and job.json then give PSNR and SSIM
      of the result and of bicubic against it.
    """

    phase_images: bool = True
    previews: bool = False  # a latent-to-RGB preview PNG per step
    latent_stats: bool = True
    compare_bicubic: bool = True
    checkpoints: bool = True  # the latent at each phase boundary, for resume
    reference: str = ""


@dataclass(frozen=True, kw_only=True)
class UpscaleConfig:
    """A progressive tiled upscale.

    image: input PNG/JPEG. mask: optional mask PNG (white = regenerate), resized with every phase.
    target: [height, width] in pixels, or scale (total) when target is [0, 0].
    phases: 0 = the fewest phases of at most max_scale each.
    steps: steps of each phase's FULL schedule; a phase runs its img2img suffix (denoise).
    denoise: [first, last] phase denoise, linear across phases (one value: all phases).
    mu: schedule shift; null = Flux's resolution rule clamped at 1.15.
    resize: pixel (decode, resize, encode), latent, or covariance (whiten, resize, recolour), each
      with resize_method; covariance: the covariance-aware resize's own parameters.
    noise_mode: flow_consistent (noise once to the start sigma) or comfy_compat (the upstream
      double noising with `renoise`, kept for comparison).
    skip_residual: the skip residual's schedule and strength; null = off.
    rewind: [min, max] of the Iterative Mixer's rewind; [0, 0] = off.
    vae_tile: pixels per VAE tile; 0 = one untiled pass, auto = 512 px tiles above 512 px.
    attention: serve a students bundle's ready layers (tasks/distill_attention.py) in every view's
      forward, optionally routed per step by a controller; null = the teacher everywhere.
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
    resize: str = "pixel"  # RESIZE_MODES
    resize_method: str = "bicubic"  # core.upscale.resize.METHODS
    covariance: CovarianceResize = field(default_factory=CovarianceResize)
    noise_mode: str = "flow_consistent"  # NOISE_MODES
    renoise: tuple[float, float] = (0.35, 0.15)
    skip_residual: SkipResidual | None = field(default_factory=SkipResidual)
    rewind: tuple[float, float] = (0.0, 0.0)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    coherence: CoherenceConfig = field(default_factory=CoherenceConfig)
    cleanup: CleanupConfig = field(default_factory=CleanupConfig)
    rope: RopeSpec = field(default_factory=lambda: RopeSpec(method="yarn"))
    vae_tile: int | str = AUTO
    seed: int = 0
    outputs: OutputsConfig = field(default_factory=OutputsConfig)
    attention: AttentionConfig | None = None

    def __post_init__(self) -> None:
        if not self.image:
            raise ValueError("image is required (a PNG or JPEG path)")
        self._check_size()
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
        if len(self.rewind) != 2:
            raise ValueError(f"rewind must be [min, max], got {list(self.rewind)}")
        for r in self.rewind:
            _unit("rewind", r)
        if isinstance(self.vae_tile, bool) or not (
            self.vae_tile == AUTO
            or (isinstance(self.vae_tile, int) and self.vae_tile >= 0 and self.vae_tile % 64 == 0)
        ):
            raise ValueError(
                f"vae_tile must be 0 (untiled), auto or a multiple of 64 pixels, got {self.vae_tile!r}"
            )

    def _check_size(self) -> None:
        if len(self.target) != 2 or any(v < 0 for v in self.target):
            raise ValueError(f"target must be [height, width] >= 0, got {list(self.target)}")
        if (self.target == (0, 0)) == (self.scale == 0):
            raise ValueError(f"set exactly one of target ({list(self.target)}) and scale ({self.scale})")
        if self.target != (0, 0) and min(self.target) < 16:
            raise ValueError(f"target must be at least 16 x 16 pixels, got {list(self.target)}")
        if self.scale and self.scale < 1:
            raise ValueError(f"scale must be >= 1 (Tessera upscales), got {self.scale}")
        if self.phases < 0:
            raise ValueError(f"phases must be >= 0, got {self.phases}")
        if self.max_scale <= 1:
            raise ValueError(f"max_scale must be > 1, got {self.max_scale}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")

    def phase_denoise(self, phases: int) -> list[float]:
        return linear_values(self.denoise[0], self.denoise[-1], phases)

    def vae_tile_px(self, height: int, width: int) -> int:
        """Tile side in pixels for a VAE pass over an image of this size (0 = one untiled pass)."""
        if self.vae_tile == AUTO:
            return AUTO_VAE_TILE if max(height, width) > AUTO_VAE_TILE else 0
        return int(self.vae_tile)


def check(cfg: UpscaleConfig) -> None:
    """Filesystem checks before any work: inputs exist and are images of a usable size."""
    from PIL import Image

    image_size = (0, 0)
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
    reference = cfg.outputs.reference
    if reference:
        if not Path(reference).is_file():
            raise FileNotFoundError(f"outputs.reference {reference!r} does not exist")
        try:
            with Image.open(reference) as im:
                im.verify()
        except OSError as err:
            raise ValueError(f"outputs.reference {reference!r} is not a readable image: {err}") from None
