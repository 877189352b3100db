"""Flux rotary position tables: three axes (text/index, row, col), theta 10 000 (Su et al.
2021, RoFormer, arXiv 2104.09864; the axes of Flux.1's `FluxPosEmbed`).

A token with ids (p0, p1, p2) gets, on axis i with d_i dims, the angles p_i * f_k for the pair
frequencies f_k = theta^(-2k/d_i), k = 0..d_i/2 - 1. cos and sin of the angles are repeated
pairwise (each pair's two channels share an angle) and concatenated over the axes:
cos, sin [S, sum d_i]. Flux.1 uses axes (16, 56, 56); the reference model (16, 24, 24).

Decisions:
- Numerics follow diffusers' `FluxPosEmbed` so that plain tables are bitwise equal to it on CPU:
  ids are read as float32, frequencies and angles are float64, the tables are cast to float32.
  Frequencies are computed as 1 / theta^(2k/d) (not theta^(-2k/d)): the two differ in the last
  float64 bit for some k.
- Frequencies are an argument (`axis_freqs`), so RoPE extension (DyPE/YaRN/NTK, core/rope/dype.py)
  only changes the frequency vectors and the per-axis attention temperature `mscale`; the angle
  and table code is shared.
- mscale multiplies the float32 tables after the cast, as the DyPE reference does; 1.0 is exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def base_frequencies(dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Native RoPE pair frequencies f_k = 1 / theta^(2k/dim), k < dim/2: [dim/2] float64 on CPU."""
    if dim <= 0 or dim % 2:
        raise ValueError(f"rope dim must be a positive even number, got {dim}")
    if theta <= 1.0:
        raise ValueError(f"rope theta must be > 1, got {theta}")
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim  # [dim/2]
    return 1.0 / (float(theta) ** exponents)


def image_ids(
    rows: int, cols: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Position ids (0, row, col) of a rows x cols token grid in row-major order: [rows * cols, 3]."""
    if rows < 1 or cols < 1:
        raise ValueError(f"token grid must be at least 1x1, got {rows}x{cols}")
    r = torch.arange(rows, device=device, dtype=dtype)
    c = torch.arange(cols, device=device, dtype=dtype)
    ids = torch.zeros(rows, cols, 3, device=device, dtype=dtype)
    ids[..., 1] = r[:, None]
    ids[..., 2] = c[None, :]
    return ids.reshape(rows * cols, 3)


def text_ids(
    n: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Position ids of n text tokens: all zeros, [n, 3] (Flux puts every text token at the origin)."""
    if n < 0:
        raise ValueError(f"text token count must be >= 0, got {n}")
    return torch.zeros(n, 3, device=device, dtype=dtype)


def rope_tables(
    ids: torch.Tensor,
    axis_freqs: Sequence[torch.Tensor],
    mscale: Sequence[float] | float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [S, sum d_i] float32 on ids' device for ids [S, n_axes] and per-axis frequencies.

    axis_freqs[i]: [d_i / 2] pair frequencies of axis i (float64 recommended, e.g.
    `base_frequencies`). mscale: one attention temperature per axis (or one for all), multiplied
    into both cos and sin of that axis (YaRN, arXiv 2309.00071 §3.4;
    DyPE, arXiv 2510.20766; core/rope/dype.py).
    """
    if ids.ndim != 2 or ids.shape[1] != len(axis_freqs):
        raise ValueError(f"ids must be [S, {len(axis_freqs)}] (one column per axis), got {tuple(ids.shape)}")
    scales = [float(mscale)] * len(axis_freqs) if isinstance(mscale, (int, float)) else list(mscale)
    if len(scales) != len(axis_freqs):
        raise ValueError(f"mscale needs one value per axis ({len(axis_freqs)}), got {len(scales)}")
    pos = ids.float()  # diffusers reads ids as float32 before the float64 products
    cos_parts, sin_parts = [], []
    for i, (freqs, scale) in enumerate(zip(axis_freqs, scales, strict=True)):
        if freqs.ndim != 1:
            raise ValueError(f"axis_freqs[{i}] must be 1-D [d/2], got shape {tuple(freqs.shape)}")
        angles = torch.outer(pos[:, i].to(freqs.dtype), freqs.to(ids.device))  # [S, d/2]
        cos = angles.cos().repeat_interleave(2, dim=1).float()  # [S, d]
        sin = angles.sin().repeat_interleave(2, dim=1).float()  # [S, d]
        if scale != 1.0:
            cos, sin = cos * scale, sin * scale
        cos_parts.append(cos)
        sin_parts.append(sin)
    return torch.cat(cos_parts, dim=-1), torch.cat(sin_parts, dim=-1)
