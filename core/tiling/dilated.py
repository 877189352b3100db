"""DemoFusion's global paths (dilated sampling), ported to flow matching.

DemoFusion (arXiv 2311.16973, "dilated sampling"), reimplemented from the paper's formulas. At phase
factor s the latent is split into s^2 interleaved sub-lattices z[:, :, h::s, w::s]; each is about
the model's native size and sees the whole image, so the model keeps global structure coherent
while the local tiles add detail. The two are fused with weight c2 = cos_f on the global path.
DemoFusion's exponents cosine_scale_2 and cosine_scale_3 are fixed at its defaults (1): no user set
them, so they are not knobs (docs/upscale.md).

Decisions:
- cos_f follows sigma: cos_f = 0.5 (1 + cos(pi (1 - sigma))), as DemoFusion follows its scheduler
  timestep t / 1000; it is 1 at sigma = 1 (start) and 0 at sigma = 0 (end). On a shifted schedule
  this differs from following the step index (I-Max, Iterative Mixer); we keep the time-based one.
- The model sees the Gaussian-blurred sub-lattice (blur sigma_blur * c3, kernel 2s - 1, the
  blurred latent re-standardised to the unblurred padded latent's scalar mean and unbiased std, as
  DemoFusion does). DemoFusion then applies the scheduler step to the *unblurred* sub-lattice. An
  Euler step is pointwise and linear, x' = x + (sigma' - sigma) v, and the sub-lattices partition
  the padded grid, so scattering each view's velocity to its positions and letting the sampler step
  the unblurred full latent once gives exactly the per-sub-lattice steps. The plan therefore
  returns a velocity (the Plan contract), never a stepped latent.
- Padding: H and W are padded at the top/left up to multiples of s with **reflect** padding
  (replicate when the pad is not smaller than the side), not DemoFusion's zeros. A zero row is far
  out of distribution for a noisy latent (unit variance at sigma ~ 1) and biases both the blur near
  the border and the re-standardisation statistics; the padded rows are cropped after the step
  either way, so only their influence on the model's view changes.
- Sub-lattices larger than the native grid get the plan's RopeSpec (DyPE) attached; with
  `native_size` None the spec is attached to every view and the backbone decides (it is a no-op
  for views within the native grid).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass

import torch
import torch.nn.functional as F

from core.rope.spec import RopeSpec
from core.tiling.views import ViewInput


def cosine_factor(sigma: float) -> float:
    """cos_f = 0.5 (1 + cos(pi (1 - sigma))): 1 at sigma = 1, 0.5 at 0.5, 0 at sigma = 0.

    DemoFusion's 0.5 (1 + cos(pi (T - t) / T)) with t / T = sigma: it follows flow time, not the
    step index, so on a shifted schedule it differs from an index-based cosine (docs/upscale.md)."""
    if not 0.0 <= sigma <= 1.0:
        raise ValueError(f"sigma must be in [0, 1], got {sigma}")
    return 0.5 * (1.0 + math.cos(math.pi * (1.0 - sigma)))


def c2(sigma: float) -> float:
    """Weight of the global (dilated) path in the local/global fusion: cos_f (DemoFusion's c2)."""
    return cosine_factor(sigma)


def c3(sigma: float) -> float:
    """Blur strength factor of the global views: 0.99 cos_f + 0.01 (DemoFusion, arXiv 2311.16973)."""
    return 0.99 * cosine_factor(sigma) + 0.01


def fuse_global(v_local: torch.Tensor, v_global: torch.Tensor, sigma: float) -> torch.Tensor:
    """(1 - c2) v_local + c2 v_global, in float32, cast back to v_local's dtype.

    DemoFusion fuses the stepped latents; for Euler (linear in v) fusing the velocities is the same.
    """
    if v_local.shape != v_global.shape:
        raise ValueError(f"local and global velocities differ in shape: {v_local.shape} vs {v_global.shape}")
    w = c2(sigma)
    fused = (1.0 - w) * v_local.float() + w * v_global.float()
    return fused.to(v_local.dtype)


def gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Per-channel Gaussian blur of x [B, C, H, W] (separable depthwise conv, reflect padding).

    Weights g(i) ~ exp(-(i - (k - 1)/2)^2 / (2 sigma^2)), normalised to sum 1. kernel_size 1 or
    sigma 0 is the identity. Computed in float32, returned in x's dtype.
    """
    if x.ndim != 4:
        raise ValueError(f"gaussian_blur expects [B, C, H, W], got shape {tuple(x.shape)}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    if sigma < 0:
        raise ValueError(f"blur sigma must be >= 0, got {sigma}")
    if kernel_size == 1 or sigma == 0:
        return x
    c = x.shape[1]
    half = kernel_size // 2
    offsets = torch.arange(kernel_size, dtype=torch.float32, device=x.device) - (kernel_size - 1) / 2
    g = torch.exp(-(offsets**2) / (2.0 * sigma**2))
    g = g / g.sum()  # [k]
    y = _pad(x.float(), (half, half, half, half))
    y = F.conv2d(y, g.view(1, 1, 1, -1).expand(c, 1, 1, kernel_size), groups=c)  # along W
    y = F.conv2d(y, g.view(1, 1, -1, 1).expand(c, 1, kernel_size, 1), groups=c)  # along H
    return y.to(x.dtype)


@dataclass(frozen=True)
class DilatedPlan:
    """DemoFusion's dilated global views at phase factor s, as a `core.tiling.views.Plan`.

    views(x [1, C, H, W], sigma, step): s^2 views [C, Hp/s, Wp/s] of the blurred, re-standardised,
    top/left-padded latent, (h, w) in row-major order. fuse: scatter each view's velocity back to
    its lattice positions and crop the padding -> v [1, C, H, W].
    """

    factor: int
    _: KW_ONLY
    blur_sigma: float = 1.0
    rope: RopeSpec | None = None
    native_size: int | None = None  # latent pixels per side of the model's native grid
    align: int = 1  # sub-lattice sides are multiples of this (2 for Flux's 2x2 token packing)

    def __post_init__(self) -> None:
        if not isinstance(self.factor, int) or self.factor < 1:
            raise ValueError(f"dilated.factor must be an integer >= 1, got {self.factor!r}")
        if self.blur_sigma < 0:
            raise ValueError(f"dilated.blur_sigma must be >= 0, got {self.blur_sigma}")
        if self.align < 1:
            raise ValueError(f"dilated.align must be >= 1, got {self.align}")
        if self.native_size is not None and self.native_size < 1:
            raise ValueError(f"dilated.native_size must be >= 1, got {self.native_size}")

    def padding(self, height: int, width: int) -> tuple[int, int]:
        """(pad_top, pad_left) that make H and W multiples of factor x align."""
        m = self.factor * self.align
        return (-height) % m, (-width) % m

    def views(self, x: torch.Tensor, sigma: float, step: int) -> list[ViewInput]:
        _check_latent(x)
        s = self.factor
        pad_h, pad_w = self.padding(x.shape[-2], x.shape[-1])
        z = _pad(x, (pad_w, 0, pad_h, 0))  # [1, C, Hp, Wp]
        z_g = gaussian_blur(z, 2 * s - 1, self.blur_sigma * c3(sigma))
        z_g = _restandardise(z_g, z)
        sub_h, sub_w = z.shape[-2] // s, z.shape[-1] // s
        too_big = self.native_size is None or sub_h > self.native_size or sub_w > self.native_size
        rope = self.rope if too_big else None
        return [
            ViewInput(z_g[0, :, h::s, w::s].contiguous(), sigma, rope) for h in range(s) for w in range(s)
        ]

    def fuse(self, x: torch.Tensor, outputs: Sequence[torch.Tensor], sigma: float, step: int) -> torch.Tensor:
        _check_latent(x)
        s = self.factor
        if len(outputs) != s * s:
            raise ValueError(f"dilated fuse expects {s * s} view outputs, got {len(outputs)}")
        pad_h, pad_w = self.padding(x.shape[-2], x.shape[-1])
        c, hp, wp = x.shape[1], x.shape[-2] + pad_h, x.shape[-1] + pad_w
        v = x.new_empty((1, c, hp, wp))
        for i, out in enumerate(outputs):
            h, w = divmod(i, s)
            if out.shape != (c, hp // s, wp // s):
                raise ValueError(f"view {i} output must be {(c, hp // s, wp // s)}, got {tuple(out.shape)}")
            v[0, :, h::s, w::s] = out.to(v.dtype)  # each position belongs to exactly one view
        return v[:, :, pad_h:, pad_w:]


def _check_latent(x: torch.Tensor) -> None:
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"dilated views are cut from a single latent [1, C, H, W], got {tuple(x.shape)}")


def _pad(x: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor:
    """F.pad (left, right, top, bottom) in reflect mode, replicate where a pad reaches the side."""
    if not any(pad):
        return x
    left, right, top, bottom = pad
    reflect_ok = max(left, right) < x.shape[-1] and max(top, bottom) < x.shape[-2]
    return F.pad(x, pad, mode="reflect" if reflect_ok else "replicate")


def _restandardise(z_g: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """z_g shifted and scaled to ref's scalar mean and unbiased std.

    The statistics are float64: a whole-tensor reduction is split across the process's threads, and
    in float32 its rounding changed with the thread count (one driver thread against two gave
    images 1/255 apart); in float64 the split's rounding sits far below float32's resolution."""
    g64, r64 = z_g.double(), ref.double()
    g_mean, g_std = g64.mean(), g64.std().clamp_min(1e-12)  # a constant z_g stays constant
    scale, shift = (r64.std() / g_std).float(), r64.mean().float()
    return ((z_g.float() - g_mean.float()) * scale + shift).to(z_g.dtype)
