"""Tiled VAE encode/decode with exact GroupNorm statistics (docs/vae.md): tile programs, the
messages of a round, the reductions and the tile geometry. core/vae/lockstep.py drives the rounds.

Per-tile GroupNorm drifts colour between tiles. Here every tile runs layer by layer as a **tile
program**: a generator over the tile's padded input window that yields a reduction request at
each layer that needs the whole image, receives the global reply through `send`, and finally
returns its output core (already cropped). One round = one request per tile, all of one kind:

- `GroupNormPartial(count, total, total_sq)` [B, G] float64 over the tile's core region at the
  layer's resolution, so each pixel counts once -> reply `GroupNormGlobal(mean, var)`.
- `AttentionPartial(k, v)` [B, N_core, D], the core tokens' keys and values of a spatial
  self-attention -> reply `AttentionGlobal(k, v)`, the concatenation over tiles in tile order, so
  each tile's queries attend to every key of the image: exact (AutoencoderKL mid-block).

Decisions:
- Tiles are a non-overlapping partition of cores; windows are cores grown by `pad` and clipped to
  the image, so the convolutions' own zero padding applies at the true border exactly as untiled.
  Window origins (and interior window ends) are aligned to `align` (the encoder's total stride), so
  every tile's stride-2 grid coincides with the untiled one.
- With pad >= the receptive-field radius (`halo_radius`) a core pixel never sees a value that the
  window edge corrupted, and with global statistics tiled == untiled up to float rounding. Halo
  pixels are normalised with the global statistics too but never enter them.
- Partial sums are shifted by the tile's own float32 mean (count, sum and sum of squares are
  rebuilt in float64 from the centred sums), which keeps the pooled variance stable without a
  float64 copy of the activations.
- All tiles' activations are alive at a round boundary: that is inherent to exact statistics.
- Tile sides are given in image pixels for both passes (`plan_tiles`), the unit a job sets.

Receptive-field radii (`halo_radius`, the default pads): TAEF2 encoder 145 image px, decoder 19
latent px; Flux.1's AutoencoderKL encoder 108 image px, decoder 18 latent px (mid-block attention
is exact through the key/value gather, so it adds none).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal, Protocol, TypeVar

import torch
from torch import nn

from core.tiling.rect import Rect


@dataclass(frozen=True)
class TileSpec:
    """One tile: its core (the pixels it owns) and its padded window, both in input pixels."""

    core: Rect
    window: Rect

    @property
    def core_in_window(self) -> Rect:
        return Rect(self.core.y0 - self.window.y0, self.core.x0 - self.window.x0, self.core.h, self.core.w)


@dataclass(frozen=True, eq=False)
class GroupNormPartial:
    """Pixel count, sum and sum of squares per (sample, group) over one tile's core: [B, G] float64."""

    count: torch.Tensor
    total: torch.Tensor
    total_sq: torch.Tensor


@dataclass(frozen=True, eq=False)
class GroupNormGlobal:
    """Whole-image mean and biased variance per (sample, group): [B, G] float64."""

    mean: torch.Tensor
    var: torch.Tensor


@dataclass(frozen=True, eq=False)
class AttentionPartial:
    """Keys and values of one tile's core tokens (row-major): [B, N_core, D] each."""

    k: torch.Tensor
    v: torch.Tensor


@dataclass(frozen=True, eq=False)
class AttentionGlobal:
    """Keys and values of every tile's core tokens, concatenated in tile order: [B, N, D] each."""

    k: torch.Tensor
    v: torch.Tensor


Request = GroupNormPartial | AttentionPartial
Reply = GroupNormGlobal | AttentionGlobal
TileProgram = Generator[Request, Reply, torch.Tensor]
VaeOp = Literal["encode", "decode"]
Message = TypeVar("Message", GroupNormPartial, GroupNormGlobal, AttentionPartial, AttentionGlobal)


def move(message: Message, device: torch.device | str) -> Message:
    """A request or reply with its tensors on `device` (to cross processes, or onto a worker's GPU)."""
    return type(message)(**{f.name: getattr(message, f.name).to(device) for f in dataclasses.fields(message)})


class TiledVae(Protocol):
    """A VAE whose encode and decode also exist as tile programs (see the module docstring)."""

    latent_channels: int
    scale_factor: int
    encode_halo: int  # receptive-field radius of the encoder, in image pixels
    decode_halo: int  # receptive-field radius of the decoder, in latent pixels

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def encode_program(self, window: torch.Tensor, core: Rect) -> TileProgram: ...

    def decode_program(self, window: torch.Tensor, core: Rect) -> TileProgram: ...


@dataclass(frozen=True)
class VaeGeometry:
    """What planning tiles needs to know of a VAE: channels, scale factor and receptive fields. A
    driver that holds no VAE plans from this (it travels in core.models.loading.ModelMeta)."""

    latent_channels: int
    scale_factor: int
    encode_halo: int  # image pixels
    decode_halo: int  # latent pixels

    @classmethod
    def of(cls, vae: TiledVae) -> VaeGeometry:
        return cls(vae.latent_channels, vae.scale_factor, vae.encode_halo, vae.decode_halo)


# --- GroupNorm with global statistics ------------------------------------------------------------


def group_norm_partial(x: torch.Tensor, core: Rect, num_groups: int) -> GroupNormPartial:
    """Shifted sums over the core of x [B, C, h, w]: with m the tile mean (float32), d1 = sum(x - m)
    and d2 = sum((x - m)^2), we send total = n m + d1 and total_sq = d2 + 2 m d1 + n m^2 in float64."""
    xs = core.cut(x)
    b, c = xs.shape[:2]
    if c % num_groups:
        raise ValueError(f"channels {c} are not divisible by num_groups {num_groups}")
    xs = xs.reshape(b, num_groups, -1).float()  # [B, G, n]
    n = xs.shape[-1]
    m = xs.mean(-1, keepdim=True)
    dev = xs - m
    d1, d2 = dev.sum(-1).double(), dev.square().sum(-1).double()
    m = m.squeeze(-1).double()
    count = torch.full_like(m, float(n))
    return GroupNormPartial(count, n * m + d1, d2 + 2 * m * d1 + n * m.square())


def apply_group_norm(x: torch.Tensor, stats: GroupNormGlobal, norm: nn.GroupNorm) -> torch.Tensor:
    """torch's GroupNorm of x [B, C, h, w] with given statistics; computed in float32, cast back."""
    b, c, h, w = x.shape
    g = norm.num_groups
    if tuple(stats.mean.shape) != (b, g):
        raise ValueError(f"group-norm statistics have shape {tuple(stats.mean.shape)}, expected {(b, g)}")
    mean = stats.mean.to(x.device, torch.float32)[:, :, None, None, None]
    rstd = torch.rsqrt(stats.var.to(x.device, torch.float32) + norm.eps)[:, :, None, None, None]
    y = ((x.float().reshape(b, g, c // g, h, w) - mean) * rstd).reshape(b, c, h, w)
    if norm.affine:
        y = y * norm.weight.float()[:, None, None] + norm.bias.float()[:, None, None]
    return y.to(x.dtype)


def group_norm_step(x: torch.Tensor, core: Rect, norm: nn.GroupNorm) -> TileProgram:
    """One exact GroupNorm inside a tile program: `x = yield from group_norm_step(x, core, norm)`."""
    reply = yield group_norm_partial(x, core, norm.num_groups)
    if not isinstance(reply, GroupNormGlobal):
        raise TypeError(f"a GroupNormPartial must be answered by GroupNormGlobal, got {type(reply).__name__}")
    return apply_group_norm(x, reply, norm)


# --- reduction ---------------------------------------------------------------------------------


def reduce_requests(requests: Sequence[Request]) -> Reply:
    """The global reply to one round of requests (one per tile, in tile order, all of one kind)."""
    if not requests:
        raise ValueError("reduce_requests needs at least one request")
    kinds = sorted({type(r).__name__ for r in requests})
    if len(kinds) != 1:
        raise ValueError(f"one round must hold requests of one kind, got {kinds}")
    first = requests[0]
    if isinstance(first, GroupNormPartial):
        dev = first.count.device
        count = sum(r.count.to(dev, torch.float64) for r in requests)
        total = sum(r.total.to(dev, torch.float64) for r in requests)
        total_sq = sum(r.total_sq.to(dev, torch.float64) for r in requests)
        mean = total / count
        return GroupNormGlobal(mean, (total_sq / count - mean.square()).clamp_min(0.0))
    if isinstance(first, AttentionPartial):
        dev = first.k.device
        k = torch.cat([r.k.to(dev) for r in requests], dim=1)
        v = torch.cat([r.v.to(dev) for r in requests], dim=1)
        return AttentionGlobal(k, v)
    raise TypeError(f"unknown request type {type(first).__name__}")


# --- geometry ------------------------------------------------------------------------------------


def _spans(n: int, tile: int, align: int) -> list[tuple[int, int]]:
    """(start, size) of a near-even split of n into ceil(n / tile) parts with aligned sizes <= tile."""
    parts = math.ceil(n / tile)
    size = math.ceil(math.ceil(n / parts) / align) * align
    return [(s, min(size, n - s)) for s in range(0, n, size)]


def split_tiles(height: int, width: int, *, tile: int, pad: int, align: int) -> list[TileSpec]:
    """Row-major tiles: cores partition the image; windows are cores grown by pad, clipped to the
    image, with origins and interior ends on multiples of align (8 for a /8 encoder, 1 to decode)."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be >= 1, got {height}x{width}")
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    if tile < align or tile % align:
        raise ValueError(f"tile must be a positive multiple of align {align}, got {tile}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")

    def window(start: int, size: int, n: int) -> tuple[int, int]:
        lo = max(0, (start - pad) // align * align)
        hi = min(n, -(-(start + size + pad) // align) * align)
        return lo, hi - lo

    specs = []
    for y0, h in _spans(height, tile, align):
        wy0, wh = window(y0, h, height)
        for x0, w in _spans(width, tile, align):
            wx0, ww = window(x0, w, width)
            specs.append(TileSpec(core=Rect(y0, x0, h, w), window=Rect(wy0, wx0, wh, ww)))
    return specs


def stitch(
    cores: Sequence[torch.Tensor], specs: Sequence[TileSpec], out_shape: Sequence[int], scale: float
) -> torch.Tensor:
    """Paste output cores [B, C, h*scale, w*scale] at their core boxes scaled by `scale` (output pixels
    per input pixel: 8 to decode, 1/8 to encode) into a tensor of out_shape."""
    if len(cores) != len(specs):
        raise ValueError(f"got {len(cores)} cores for {len(specs)} tiles")
    ratio = Fraction(scale).limit_denominator(1 << 16)
    out = cores[0].new_zeros(tuple(out_shape))
    for core, spec in zip(cores, specs, strict=True):
        box = spec.core.scale(ratio.numerator, ratio.denominator)
        if tuple(core.shape[-2:]) != (box.h, box.w):
            raise ValueError(f"tile {spec.core} returned {tuple(core.shape)}, expected size {(box.h, box.w)}")
        box.cut(out).copy_(core)
    return out


def halo_radius(ops: Sequence[str]) -> int:
    """Receptive-field radius, in input pixels, of a chain of layers, measured from the input
    pixels that own an output pixel (its /f block when encoding, its source latent when decoding).

    ops, in forward order: "conv" (3x3, stride 1, pad 1), "down" (3x3, stride 2, pad 1),
    "down_asym" (diffusers: zero pad (0, 1, 0, 1), then 3x3 stride 2), "up" (nearest x2).
    Pointwise layers (1x1 convs, activations, GroupNorm with global statistics, attention with the
    gathered keys) add nothing. Worst case over all output phases; hand-derivable, see the tests.
    """
    downs = sum(op.startswith("down") for op in ops)
    ups = ops.count("up")
    if downs and ups:
        raise ValueError("halo_radius handles encoders (downsampling) or decoders (upsampling), not both")
    phases = range(1 << ups)  # decoder: the 2^ups output pixels of one latent pixel
    owner = (0, (1 << downs) - 1)  # encoder: the 2^downs input pixels of one latent pixel
    radius = 0
    for y in phases:
        lo, hi = y, y
        for op in reversed(ops):
            if op == "conv":
                lo, hi = lo - 1, hi + 1
            elif op == "down":
                lo, hi = 2 * lo - 1, 2 * hi + 1
            elif op == "down_asym":
                lo, hi = 2 * lo, 2 * hi + 2
            elif op == "up":
                lo, hi = lo // 2, hi // 2
            else:
                raise ValueError(f"unknown op {op!r} (expected conv, down, down_asym or up)")
        radius = max(radius, owner[0] - lo, hi - owner[1])
    return radius


@dataclass(frozen=True)
class TilePlan:
    """The tiles of one pass: their specs in row-major order, the output's shape, and the output
    pixels per input pixel (8 to decode, 1/8 to encode)."""

    op: VaeOp
    specs: tuple[TileSpec, ...]
    out_shape: tuple[int, ...]
    scale: float


def plan_tiles(
    op: VaeOp, shape: Sequence[int], vae: VaeGeometry, *, tile_px: int, pad: int | None = None
) -> TilePlan:
    """Tiles for encoding images [B, 3, H, W] or decoding latents [B, C, h, w].

    tile_px: the tile side in image pixels for both passes (rounded down to the VAE's scale factor,
    at least one latent pixel). pad: the window margin in input pixels; None = the receptive field.
    """
    if op not in ("encode", "decode"):
        raise ValueError(f"op must be encode or decode, got {op!r}")
    if len(shape) != 4:
        raise ValueError(f"{op} input must be [B, C, H, W], got shape {tuple(shape)}")
    b, _, h, w = shape
    f = vae.scale_factor
    if op == "encode":
        if h % f or w % f:
            raise ValueError(f"image size {h}x{w} must be a multiple of the VAE scale factor {f}")
        pad = vae.encode_halo if pad is None else pad
        specs = split_tiles(h, w, tile=max(f, tile_px // f * f), pad=pad, align=f)
        return TilePlan(op, tuple(specs), (b, vae.latent_channels, h // f, w // f), 1 / f)
    pad = vae.decode_halo if pad is None else pad
    specs = split_tiles(h, w, tile=max(1, tile_px // f), pad=pad, align=1)
    return TilePlan(op, tuple(specs), (b, 3, h * f, w * f), f)
