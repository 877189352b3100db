"""DyPE: time-dependent RoPE extrapolation for views larger than the native grid.

Algorithms.md §8 (DyPE, arXiv 2510.20766; guyyariv/DyPE, MIT). Per spatial axis of d dims with
extent L (max position id + 1) and native extent L0 (64 patches = 1024 px / 16 for Flux.1), the
scale is s = max(L / L0, 1). At s = 1 nothing changes. Above it:

- static YaRN (NTK-by-parts, §8.2): high-frequency pairs keep native RoPE, middle pairs follow
  NTK-aware scaling, low-frequency pairs are position-interpolated (PI, f / s); cos and sin carry
  the attention temperature mscale = 0.1 ln s + 1;
- DyPE (§8.3) moves the YaRN thresholds with flow time t = sigma, so that as t falls more pairs
  return to native RoPE ("low-frequency structures converge early").

Decisions:
- v1: kappa = lambda_s t^lambda_t with lambda_s = lambda_t = `exponent` (2 by default, the
  official values; tying lambda_s to the exponent follows the ttulttul Qwen port), thresholds
  beta_i <- beta_i^kappa. v2 (the official Feb 2026 update): kappa = t^lambda_t, beta_i <- beta_i
  kappa. gamma_i likewise.
- NTK variant: theta' = theta (s^(d/(d-2)))^(2 t^lambda_t), factor clamped at >= 1 (dynamic), or
  theta s^(d/(d-2)) (static). With the default exponent this is the official 2 t^2. The official
  code gives NTK no attention temperature, so its mscale is 1.
- mscale is not time-modulated (official code), and axis 0 (text/index) is never extended.
- The ramps are computed in float64 (the official code builds them in float32); frequencies agree
  with it to float64 rounding.
- Correction dims r(n) for n <= 0 (v2 at t = 0) are +inf. They are clipped to [-d, d] before
  floor/ceil, which leaves every ramp unchanged (any low above d/2 yields the same all-PI ramp)
  and keeps the t -> 0 edge finite: the §8.3 "low > high -> PI everywhere" case.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from core.rope.spec import RopeSpec
from core.rope.tables import base_frequencies, image_ids, rope_tables, text_ids

BETA0, BETA1, GAMMA0, GAMMA1 = 1.25, 0.75, 16.0, 2.0
BASE_PATCHES = 64  # Flux.1: 1024 px / (8 VAE * 2 patch)


def correction_dim(rotations: float, dim: int, *, theta: float, base_patches: int) -> float:
    """Pair index whose wavelength fits `rotations` turns in L0 positions (YaRN's inverse-dim formula).

    r(n) = d ln(L0 / (2 pi n)) / (2 ln theta), clipped to [-d, d]; n <= 0 gives d (i.e. +inf).
    """
    if rotations <= 0.0:
        return float(dim)
    r = dim * math.log(base_patches / (2.0 * math.pi * rotations)) / (2.0 * math.log(theta))
    return min(max(r, -float(dim)), float(dim))


def correction_ramp(fast: float, slow: float, dim: int, *, theta: float, base_patches: int) -> torch.Tensor:
    """ramp(k) = clamp((k - low) / (high - low), 0, 1) over pairs k < d/2, float64 (§8.2 Range).

    fast > slow are rotation counts: low = max(floor r(fast), 0), high = min(ceil r(slow), d/2),
    with high += 0.001 when low == high. 0 below the band (kept by the mask), 1 above it.
    """
    low = max(math.floor(correction_dim(fast, dim, theta=theta, base_patches=base_patches)), 0)
    high = min(math.ceil(correction_dim(slow, dim, theta=theta, base_patches=base_patches)), dim // 2)
    span = float(high - low) if high != low else 0.001
    k = torch.arange(dim // 2, dtype=torch.float64)
    return ((k - low) / span).clamp(0.0, 1.0)


def yarn_frequencies(
    dim: int,
    scale: float,
    *,
    theta: float = 10000.0,
    base_patches: int = BASE_PATCHES,
    beta0: float = BETA0,
    beta1: float = BETA1,
    gamma0: float = GAMMA0,
    gamma1: float = GAMMA1,
) -> torch.Tensor:
    """Static YaRN (NTK-by-parts) pair frequencies [dim/2] float64 (§8.2).

    f_lin = f_base / s, f_ntk = (theta s^(d/(d-2)))^(-2k/d);
    f1 = f_lin (1 - m_beta) + f_ntk m_beta; f = f1 (1 - m_gamma) + f_base m_gamma,
    with masks m = 1 - ramp over the beta and gamma correction ranges.
    """
    if scale < 1.0:
        raise ValueError(f"yarn scale must be >= 1, got {scale}")
    if not (beta0 >= beta1 >= 0.0 and gamma0 >= gamma1 >= 0.0):
        raise ValueError(
            f"yarn thresholds must satisfy beta0 >= beta1 >= 0 and gamma0 >= gamma1 >= 0, "
            f"got beta=({beta0}, {beta1}), gamma=({gamma0}, {gamma1})"
        )
    f_base = base_frequencies(dim, theta)
    f_lin = f_base / scale
    f_ntk = base_frequencies(dim, theta * scale ** (dim / (dim - 2)))
    m_beta = 1.0 - correction_ramp(beta0, beta1, dim, theta=theta, base_patches=base_patches)
    f1 = f_lin * (1.0 - m_beta) + f_ntk * m_beta
    m_gamma = 1.0 - correction_ramp(gamma0, gamma1, dim, theta=theta, base_patches=base_patches)
    return f1 * (1.0 - m_gamma) + f_base * m_gamma


def ntk_frequencies(
    dim: int,
    scale: float,
    *,
    theta: float = 10000.0,
    t: float | None = None,
    dynamic: bool = False,
    exponent: float = 2.0,
) -> torch.Tensor:
    """NTK-aware pair frequencies [dim/2] float64: base frequencies at theta' = theta * factor (§8.3).

    static: factor = s^(d/(d-2)); dynamic: factor = max(1, (s^(d/(d-2)))^(2 t^exponent)).
    """
    if scale < 1.0:
        raise ValueError(f"ntk scale must be >= 1, got {scale}")
    factor = scale ** (dim / (dim - 2))
    if dynamic:
        factor = max(1.0, factor ** (2.0 * _flow_time(t) ** exponent))
    return base_frequencies(dim, theta * factor)


def dype_axis(
    dim: int,
    extent: int,
    t: float | None,
    *,
    method: Literal["yarn", "ntk"] = "yarn",
    dynamic: bool = True,
    exponent: float = 2.0,
    version: Literal["v1", "v2"] = "v2",
    base_patches: int = BASE_PATCHES,
    theta: float = 10000.0,
) -> tuple[torch.Tensor, float]:
    """(pair frequencies [dim/2] float64, mscale) for one axis of `extent` positions at flow time t.

    extent <= base_patches returns the base frequencies and mscale 1, so native-size views are
    untouched. t (= sigma in [0, 1]) is needed only when dynamic.
    """
    if method not in ("yarn", "ntk"):
        raise ValueError(f"dype method must be yarn or ntk, got {method!r}")
    if version not in ("v1", "v2"):
        raise ValueError(f"dype version must be v1 or v2, got {version!r}")
    if exponent <= 0:
        raise ValueError(f"dype exponent must be > 0, got {exponent}")
    if base_patches < 1 or extent < 1:
        raise ValueError(f"dype extents must be >= 1, got extent={extent}, base_patches={base_patches}")
    scale = max(extent / base_patches, 1.0)
    if scale == 1.0:
        return base_frequencies(dim, theta), 1.0
    if method == "ntk":
        return ntk_frequencies(dim, scale, theta=theta, t=t, dynamic=dynamic, exponent=exponent), 1.0
    beta0, beta1, gamma0, gamma1 = BETA0, BETA1, GAMMA0, GAMMA1
    if dynamic:
        time = _flow_time(t)
        if version == "v1":
            kappa = exponent * time**exponent  # lambda_s t^lambda_t, lambda_s tied to lambda_t
            beta0, beta1, gamma0, gamma1 = beta0**kappa, beta1**kappa, gamma0**kappa, gamma1**kappa
        else:
            kappa = time**exponent
            beta0, beta1, gamma0, gamma1 = beta0 * kappa, beta1 * kappa, gamma0 * kappa, gamma1 * kappa
    freqs = yarn_frequencies(
        dim,
        scale,
        theta=theta,
        base_patches=base_patches,
        beta0=beta0,
        beta1=beta1,
        gamma0=gamma0,
        gamma1=gamma1,
    )
    return freqs, 0.1 * math.log(scale) + 1.0


def dype_tables(
    rows: int,
    cols: int,
    *,
    axes_dims: tuple[int, int, int],
    sigma: float | None,
    spec: RopeSpec | None,
    base_patches: int = BASE_PATCHES,
    theta: float = 10000.0,
    text_tokens: int = 0,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [text_tokens + rows * cols, sum(axes_dims)] float32 for a rows x cols token grid.

    Rows are the text tokens (ids at 0) followed by the image tokens in row-major order (Flux's
    joint sequence). Axis 1 (rows) is extended with extent `rows`, axis 2 (cols) with `cols`;
    axis 0 is untouched. spec None or method "none" gives plain RoPE. A dynamic spec needs sigma.
    """
    if len(axes_dims) != 3:
        raise ValueError(f"axes_dims must have 3 entries (index, row, col), got {axes_dims}")
    ids = torch.cat([text_ids(text_tokens, device=device), image_ids(rows, cols, device=device)])
    freqs = [base_frequencies(axes_dims[0], theta)]
    mscales = [1.0]
    for dim, extent in zip(axes_dims[1:], (rows, cols), strict=True):
        if spec is None or spec.method == "none":
            f, m = base_frequencies(dim, theta), 1.0
        else:
            f, m = dype_axis(
                dim,
                extent,
                sigma,
                method=spec.method,
                dynamic=spec.dynamic,
                exponent=spec.exponent,
                version=spec.version,
                base_patches=base_patches,
                theta=theta,
            )
        freqs.append(f)
        mscales.append(m)
    return rope_tables(ids, freqs, mscales)


def _flow_time(t: float | None) -> float:
    if t is None or not 0.0 <= t <= 1.0:
        raise ValueError(f"dynamic DyPE needs the flow time t (sigma) in [0, 1], got {t}")
    return float(t)
