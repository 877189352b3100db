"""Landmark branch: exact softmax over every conditioning token plus a 2-D stratified grid of image tokens.

Keys are a subset L of the joint sequence: all n_text conditioning tokens (they carry the prompt, and
there are few of them) and m_r x m_c image landmarks, one per stratum of an m_r x m_c partition of
the latent token grid, at the stratum's centre (a stride grid over rows and columns). Raster-order
evenly spaced indices would instead cluster along whole image rows and leave vertical structure
unsampled; a 2-D grid covers the image uniformly. The output is softmax(q k_L^T / sqrt(d)) v_L in
fp32.

The target landmark count is M = clamp(round(f n_img), min, max), capped at n_img. A finite max keeps
the branch linear: with an uncapped fraction the branch costs f N^2 (0.08 N^2 at f = 0.08). The grid
holds m_r m_c <= M landmarks with m_r / m_c close to rows / cols; when M >= n_img it is every image
token, and the branch is exact softmax attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from core.attention.geometry import TokenGeometry, index_to

QUERY_CHUNK = 4096


def landmark_count(n_img: int, *, fraction: float, minimum: int, maximum: int) -> int:
    """M = clamp(round(fraction * n_img), minimum, maximum), and at most n_img (round half up)."""
    m = math.floor(fraction * n_img + 0.5)
    return min(n_img, max(minimum, min(maximum, m)))


def landmark_grid(rows: int, cols: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices of an m_r x m_c stride grid with m_r m_c <= m (at least 1 x 1).

    m_r = round(sqrt(m rows / cols)) and m_c = floor(m / m_r), each clamped to the grid, then m_r is
    raised to floor(m / m_c) where the column clamp left room. Stratum i of n cells over m_s strata
    is [i n / m_s, (i + 1) n / m_s); its landmark is the cell at floor((i + 1/2) n / m_s).
    """
    m = max(1, m)
    m_r = min(rows, max(1, math.floor(math.sqrt(m * rows / cols) + 0.5)))
    m_c = min(cols, max(1, m // m_r))
    m_r = min(rows, max(1, m // m_c))
    r = torch.floor((torch.arange(m_r, dtype=torch.float64) + 0.5) * rows / m_r).long()
    c = torch.floor((torch.arange(m_c, dtype=torch.float64) + 0.5) * cols / m_c).long()
    return r, c


def landmark_indices(geometry: TokenGeometry, m: int) -> torch.Tensor:
    """Sorted key indices [n_text + m_r m_c]: every text token, then the grid's image tokens."""
    r, c = landmark_grid(geometry.rows, geometry.cols, m)
    image = geometry.n_text + (r[:, None] * geometry.cols + c[None, :]).reshape(-1)
    return torch.cat([torch.arange(geometry.n_text), image])


def landmark_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, *, query_chunk: int = QUERY_CHUNK
) -> torch.Tensor:
    """Exact softmax of q [B, H, N, d] over the keys k[:, :, index], v[:, :, index], in fp32."""
    index = index_to(index, k.device)
    kl = k.index_select(2, index).float()  # [B, H, L, d]
    vl = v.index_select(2, index).float()
    outs = [
        F.scaled_dot_product_attention(q[:, :, s : s + query_chunk].float(), kl, vl)
        for s in range(0, q.shape[2], query_chunk)
    ]
    return torch.cat(outs, dim=2).to(v.dtype)
