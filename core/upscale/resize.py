"""Resizing images, latents and masks, and the covariance-aware latent upscale.

Pure torch (no PIL): bilinear, bicubic, area and nearest go through F.interpolate (bicubic is
torch's Keys kernel with a = -0.75, as ComfyUI's common_upscale); lanczos is separable Lanczos-3
resampling written here, each axis a banded weight matrix stored as (index, weight) taps.

Decisions:
- Downscaling antialiases (F.interpolate antialias for bilinear/bicubic; lanczos widens its
  support by in/out as PIL does). If either axis shrinks the whole call antialiases. area and
  nearest have no antialias option (area already averages).
- nearest is torch's "nearest-exact" (pixel centres), as ComfyUI's nearest-exact.
- Lanczos at the borders drops taps outside the image and renormalises the rest (PIL's rule), so
  a constant image stays constant.
- Images are clamped to [0, 1] after bicubic and lanczos (their kernels overshoot); latents never.
- Neither bicubic (a = -0.75) nor Lanczos-3 reproduces a linear ramp exactly: both carry a small
  first-moment bias that alternates in sign at x2 (tests pin it).
- covariance_upscale (docs/upscale.md, "Resize") fixes each eigenvector's sign (largest-magnitude
  entry positive) so that equal covariances give equal bases; upstream leaves eigh's signs, which
  can flip channels in the moment-match step. Pixel subsampling draws without replacement
  (upstream: with).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from core.flow.seeds import cpu_generator, derive_seed

ResizeMethod = Literal["bicubic", "bilinear", "lanczos", "area", "nearest"]
METHODS: tuple[ResizeMethod, ...] = ("bicubic", "bilinear", "lanczos", "area", "nearest")
LANCZOS_A = 3
LANCZOS_CHANNELS = (1, 3, 4)  # upstream lanczos goes through PIL, which takes only these


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise ValueError(f"size must be >= 1 on both axes, got {tuple(size)}")
    return h, w


def lanczos_kernel(d: torch.Tensor, a: int = LANCZOS_A) -> torch.Tensor:
    """L(d) = sinc(d) sinc(d / a) for |d| < a, else 0 (sinc(x) = sin(pi x) / (pi x))."""
    return torch.where(d.abs() < a, torch.sinc(d) * torch.sinc(d / a), torch.zeros_like(d))


def lanczos_taps(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Banded Lanczos-3 resampling weights for one axis: (index [n_out, K] int64, weight [n_out, K] fp32).

    Output i samples the input at c = (i + 0.5) n_in / n_out - 0.5 (pixel centres); the filter
    scale is f = max(1, n_in / n_out) (antialias when shrinking) and the tap at input j weighs
    L((j - c) / f). Taps outside [0, n_in) get weight 0; each row is normalised to sum 1.
    """
    scale = n_in / n_out
    f = max(1.0, scale)
    half = math.ceil(LANCZOS_A * f)
    centre = (torch.arange(n_out, dtype=torch.float64) + 0.5) * scale - 0.5  # [n_out]
    first = torch.floor(centre).long() - half + 1  # covers every j with |j - c| < a f
    idx = first[:, None] + torch.arange(2 * half)[None, :]  # [n_out, K]
    w = lanczos_kernel((idx.double() - centre[:, None]) / f)
    w = torch.where((idx >= 0) & (idx < n_in), w, torch.zeros_like(w))
    w = w / w.sum(dim=1, keepdim=True)
    return idx.clamp(0, n_in - 1), w.float()


def _lanczos_last_axis(x: torch.Tensor, n_out: int) -> torch.Tensor:
    idx, w = lanczos_taps(x.shape[-1], n_out)
    idx, w = idx.to(x.device), w.to(x.device)
    out = torch.zeros(*x.shape[:-1], n_out, device=x.device, dtype=torch.float32)
    for k in range(idx.shape[1]):  # K small gathers instead of an [.., n_out, K] temporary
        out += x[..., idx[:, k]] * w[:, k]
    return out


def _resample(x: torch.Tensor, size: tuple[int, int], method: str) -> torch.Tensor:
    """Resize [B, C, H, W] to size (h, w) in fp32; no clamping."""
    if method not in METHODS:
        raise ValueError(f"resize method must be one of {METHODS}, got {method!r}")
    if x.ndim != 4:
        raise ValueError(f"expected [B, C, H, W], got shape {tuple(x.shape)}")
    h, w = _check_size(size)
    xf = x.float()
    if (h, w) == tuple(x.shape[-2:]):
        return xf
    shrink = h < x.shape[-2] or w < x.shape[-1]
    if method == "lanczos":
        y = _lanczos_last_axis(xf, w)  # [B, C, H, w]
        return _lanczos_last_axis(y.transpose(-1, -2), h).transpose(-1, -2)  # [B, C, h, w]
    if method in ("bilinear", "bicubic"):
        return F.interpolate(xf, size=(h, w), mode=method, align_corners=False, antialias=shrink)
    mode = "nearest-exact" if method == "nearest" else "area"
    return F.interpolate(xf, size=(h, w), mode=mode)


def resize_image(img: torch.Tensor, size: tuple[int, int], method: str = "bicubic") -> torch.Tensor:
    """Resize images [B, 3, H, W] in [0, 1] to size (h, w); clamped to [0, 1] after bicubic/lanczos."""
    out = _resample(img, size, method)
    if method in ("bicubic", "lanczos"):
        out = out.clamp(0.0, 1.0)
    return out.to(img.dtype)


def resize_latent(
    z: torch.Tensor, size: tuple[int, int], method: str = "bicubic"
) -> tuple[torch.Tensor, str]:
    """Resize latents [B, C, h, w] to size; returns (latent, method used).

    lanczos on C not in {1, 3, 4} falls back to bicubic, as upstream; the caller records it.
    """
    used = latent_method(method, z.shape[1])
    return _resample(z, size, used).to(z.dtype), used


def latent_method(method: str, channels: int) -> str:
    """The kernel a latent resize of `channels` channels uses: lanczos only on 1, 3 or 4 channels
    (upstream resizes through PIL, which takes only those), else bicubic."""
    return "bicubic" if method == "lanczos" and channels not in LANCZOS_CHANNELS else method


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize masks [B, 1, H, W] bilinearly (antialiased when shrinking), clamped to [0, 1]."""
    return _resample(mask, size, "bilinear").clamp(0.0, 1.0).to(mask.dtype)


def _flat(z: torch.Tensor) -> torch.Tensor:
    return z.float().reshape(z.shape[0], z.shape[1], -1)  # [B, C, N]


def latent_moments(
    z: torch.Tensor,
    *,
    per_batch: bool = True,
    sample_pixels: int = 0,
    shrinkage: float = 0.05,
    epsilon: float = 1e-5,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean [B', C] and shrunk, jittered covariance [B', C, C] over pixels.

    The first two steps of `covariance_upscale`.

    B' = B per item, or 1 pooled over the batch. Covariance is unbiased (N - 1), then
    Sigma <- (1 - a) Sigma + a diag(Sigma) + epsilon I. sample_pixels > 0 estimates on that many
    distinct pixels drawn by a generator keyed (seed, "covariance_pixels").
    """
    flat = _flat(z)  # [B, C, N]
    n = flat.shape[-1]
    if 0 < sample_pixels < n:
        pick = torch.randperm(n, generator=cpu_generator(derive_seed(seed, "covariance_pixels")))
        flat = flat[..., pick[:sample_pixels].to(flat.device)]
    if not per_batch:
        flat = flat.transpose(0, 1).reshape(1, flat.shape[1], -1)  # [1, C, B N]
    mu = flat.mean(dim=-1)  # [B', C]
    centred = flat - mu[..., None]
    cov = centred @ centred.transpose(-1, -2) / max(centred.shape[-1] - 1, 1)  # [B', C, C]
    diag = torch.diag_embed(torch.diagonal(cov, dim1=-2, dim2=-1))
    eye = torch.eye(cov.shape[-1], device=cov.device, dtype=cov.dtype)
    return mu, (1.0 - shrinkage) * cov + shrinkage * diag + epsilon * eye


def _eig(cov: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(U [B, C, C], sqrt(lambda) [B, C]) with lambda >= max(epsilon, 1e-12) and fixed column signs."""
    lam, u = torch.linalg.eigh(cov.double())
    lead = u.abs().argmax(dim=-2, keepdim=True)  # [B, 1, C]: each eigenvector's largest entry
    u = u * torch.sign(torch.gather(u, -2, lead))
    return u.float(), lam.clamp_min(max(epsilon, 1e-12)).sqrt().float()


def _recolour(y: torch.Tensor, u: torch.Tensor, sqrt_lam: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """U diag(sqrt_lam) y + mu for y [B, C, N]."""
    return u @ (sqrt_lam[..., None] * y) + mu[..., None]


def _whiten(x: torch.Tensor, u: torch.Tensor, sqrt_lam: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """diag(1/sqrt_lam) U^T (x - mu) for x [B, C, N]."""
    return (u.transpose(-1, -2) @ (x - mu[..., None])) / sqrt_lam[..., None]


def covariance_upscale(
    z: torch.Tensor,
    size: tuple[int, int],
    *,
    mode: str = "whiten",
    method: str = "bicubic",
    moment_match: bool = True,
    per_batch: bool = True,
    sample_pixels: int = 0,
    shrinkage: float = 0.05,
    epsilon: float = 1e-5,
    seed: int = 0,
    stats_latent: torch.Tensor | None = None,
) -> torch.Tensor:
    """Whiten, resize, recolour, then optionally moment-match (the Upscaler's LatentUpscaleAdvanced).

    Stats (mu, Sigma = U Lambda U^T) come from `stats_latent` (default z). y = Lambda^-1/2 U^T (z - mu)
    is resized with `method` (lanczos falls back as in resize_latent) and recoloured,
    z_hat = U Lambda^1/2 y_hat + mu. moment_match recomputes (mu_hat, Sigma_hat) on z_hat per item
    (same shrink and jitter, all pixels) and applies the PCA-whitening colour transfer
    z* = U Lambda^1/2 Lambda_hat^-1/2 U_hat^T (z_hat - mu_hat) + mu. mode "none" (upstream's
    covariance_mode) is a plain resize_latent. Computed in fp32; returns z's dtype.
    """
    if mode not in ("whiten", "none"):
        raise ValueError(f"covariance mode must be whiten or none, got {mode!r}")
    if z.ndim != 4:
        raise ValueError(f"expected a latent [B, C, h, w], got shape {tuple(z.shape)}")
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if sample_pixels < 0:
        raise ValueError(f"sample_pixels must be >= 0, got {sample_pixels}")
    stats = z if stats_latent is None else stats_latent
    if stats.ndim != 4 or stats.shape[1] != z.shape[1]:
        raise ValueError(f"stats_latent must be [B, {z.shape[1]}, h, w], got {tuple(stats.shape)}")
    if per_batch and stats.shape[0] != z.shape[0]:
        raise ValueError(f"per-batch stats need stats_latent batch {z.shape[0]}, got {stats.shape[0]}")
    if mode == "none":
        return resize_latent(z, size, method)[0]
    b, c = z.shape[:2]
    h, w = _check_size(size)
    mu, cov = latent_moments(
        stats,
        per_batch=per_batch,
        sample_pixels=sample_pixels,
        shrinkage=shrinkage,
        epsilon=epsilon,
        seed=seed,
    )
    u, sqrt_lam = _eig(cov, epsilon)
    mu, u, sqrt_lam = mu.expand(b, c), u.expand(b, c, c), sqrt_lam.expand(b, c)  # pooled stats: B' = 1

    y = _whiten(_flat(z), u, sqrt_lam, mu).reshape(b, c, *z.shape[-2:])
    y_up, _ = resize_latent(y, (h, w), method)
    z_hat = _recolour(_flat(y_up), u, sqrt_lam, mu)  # [B, C, h w]
    if moment_match:
        mu_hat, cov_hat = latent_moments(z_hat.reshape(b, c, h, w), shrinkage=shrinkage, epsilon=epsilon)
        u_hat, sqrt_hat = _eig(cov_hat, epsilon)
        z_hat = _recolour(_whiten(z_hat, u_hat, sqrt_hat, mu_hat), u, sqrt_lam, mu)
    return z_hat.reshape(b, c, h, w).to(z.dtype)


@dataclass(frozen=True, kw_only=True)
class CovarianceResize:
    """The parameters of `covariance_upscale` a user chooses (docs/upscale.md, "Resize"): moment
    matching after the recolour, the covariance shrinkage a, and how many pixels estimate the
    statistics (0 = all)."""

    moment_match: bool = True
    shrinkage: float = 0.05
    sample_pixels: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.shrinkage <= 1.0:
            raise ValueError(f"covariance.shrinkage must be in [0, 1], got {self.shrinkage}")
        if self.sample_pixels < 0:
            raise ValueError(
                f"covariance.sample_pixels must be >= 0 (0 = all pixels), got {self.sample_pixels}"
            )
