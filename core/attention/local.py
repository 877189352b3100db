"""Local branch: exact softmax over a 2-D, tile-aligned neighbourhood of each image query.

The latent token grid (rows x cols) is cut into tiles of t x t tokens (the last row and column of
tiles may be partial). An image query in tile (a, b) attends to every text key and to the image keys
of the tiles (a', b') with |a' - a| <= r and |b' - b| <= r, clipped at the grid's border: a
(2r + 1)t-token square window around its tile. Text queries attend to every key. The window is a
property of the query's tile, not of the query, so the attention pattern is block sparse with t^2 x
t^2 blocks: the form a fused kernel (FlexAttention's block mask, a Triton tile loop) computes, and
the form CLEAR (arXiv 2412.16112) and LoLCATs (arXiv 2410.10254) show is what keeps a linearised
Flux or LLM layer close to its teacher.

Two formulations, tested against each other:
- `local_mask`: the dense [N, N] boolean mask (the reference: small grids only);
- `local_attention`: a gather per query tile (its t^2 queries, the text keys and its window's keys,
  padded to a fixed width and masked), batched over chunks of tiles so memory stays bounded by
  `chunk_elements` instead of N x N. Everything runs in fp32.
- `local_attention_at`: the same pattern for a subset of query positions (a distillation capture's
  queries, or the gate's probes): each query gathers its own tile's window, so the cost is that of
  the queries kept, not of the whole grid.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from core.attention.geometry import TokenGeometry, index_to

# gathered q, k, v and scores per chunk: 512 MiB of fp32. At Flux's 2,100-key windows one query of
# 24 heads gathers 13 M elements, so a smaller budget makes the 64 gate probes 64 chunks of launches.
CHUNK_ELEMENTS = 1 << 27
# queries x keys below which local_attention_at takes its dense mask. Measured on an H200 for the 64
# gate probes (bench/results/attention_bench_masked_probes.json against attention_bench.json): the
# mask is faster at 4,608 and 16,896 keys (0.3 M and 1.1 M elements), slower at 66,048 (4.2 M).
MASK_ELEMENTS = 1 << 21


class LocalIndex(NamedTuple):
    """Gather indices of the tile formulation, T tiles in raster order.

    query: [T, t^2] sequence index of each query slot; n (one past the last token) for a slot
        outside the grid (partial tiles), which the output discards.
    key: [T, K] sequence index of each key slot: the n_text text keys, then the window's tiles in
        raster order; slots outside the grid hold 0 and are masked.
    key_valid: [T, K] False for the padded key slots.
    """

    query: torch.Tensor
    key: torch.Tensor
    key_valid: torch.Tensor


def local_index(geometry: TokenGeometry, *, tile: int, radius: int) -> LocalIndex:
    """The tile formulation's gather indices for `geometry` (CPU tensors)."""
    rows, cols, n_text, t = geometry.rows, geometry.cols, geometry.n_text, tile
    tiles_r, tiles_c = math.ceil(rows / t), math.ceil(cols / t)
    ti = torch.arange(tiles_r).repeat_interleave(tiles_c)  # [T] tile row
    tj = torch.arange(tiles_c).repeat(tiles_r)  # [T] tile column
    a = torch.arange(t)
    q_row = ti[:, None] * t + a.repeat_interleave(t)[None]  # [T, t^2]
    q_col = tj[:, None] * t + a.repeat(t)[None]
    q_inside = (q_row < rows) & (q_col < cols)
    query = torch.where(q_inside, n_text + q_row * cols + q_col, geometry.n)
    key, key_valid = window_keys(geometry, torch.arange(tiles_r * tiles_c), tile=tile, radius=radius)
    return LocalIndex(query, key, key_valid)


def window_keys(
    geometry: TokenGeometry, tile_ids: torch.Tensor, *, tile: int, radius: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key positions [T', K] and their validity of the windows of `tile_ids` [T'] (row-major tile
    numbers, CPU): every text key, then the (2r + 1)^2 tiles around the tile. Built for the tiles asked
    only, so a few queries (a capture's, or the gates' probes) do not pay for the whole grid's table."""
    rows, cols, n_text, t = geometry.rows, geometry.cols, geometry.n_text, tile
    tiles_r, tiles_c = math.ceil(rows / t), math.ceil(cols / t)
    ti, tj = tile_ids // tiles_c, tile_ids % tiles_c
    a = torch.arange(t)
    reach_r, reach_c = min(radius, tiles_r - 1), min(radius, tiles_c - 1)
    k_row = (ti[:, None] + torch.arange(-reach_r, reach_r + 1))[:, :, None] * t + a  # [T, nr, t]
    k_col = (tj[:, None] + torch.arange(-reach_c, reach_c + 1))[:, :, None] * t + a  # [T, nc, t]
    k_row = k_row.reshape(len(ti), -1, 1)  # [T, nr t, 1]
    k_col = k_col.reshape(len(ti), 1, -1)  # [T, 1, nc t]
    k_inside = (k_row >= 0) & (k_row < rows) & (k_col >= 0) & (k_col < cols)  # [T, nr t, nc t]
    k_image = torch.where(k_inside, n_text + k_row * cols + k_col, 0).reshape(len(ti), -1)
    k_inside = k_inside.reshape(len(ti), -1)
    text = torch.arange(n_text).expand(len(ti), n_text)
    key = torch.cat([text, k_image], dim=1)
    key_valid = torch.cat([torch.ones_like(text, dtype=torch.bool), k_inside], dim=1)
    return key, key_valid


def local_mask(geometry: TokenGeometry, *, tile: int, radius: int) -> torch.Tensor:
    """Dense [N, N] mask of the local pattern (True: query row attends to key column)."""
    n_text, n = geometry.n_text, geometry.n
    pos = torch.arange(geometry.n_img)
    tile_r, tile_c = (pos // geometry.cols) // tile, (pos % geometry.cols) // tile
    near = ((tile_r[:, None] - tile_r[None]).abs() <= radius) & (
        (tile_c[:, None] - tile_c[None]).abs() <= radius
    )
    mask = torch.ones(n, n, dtype=torch.bool)
    mask[n_text:, n_text:] = near
    return mask


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    geometry: TokenGeometry,
    *,
    tile: int,
    radius: int,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Local-window softmax of q, k, v [B, H, N, d] (N = geometry.n) -> [B, H, N, d], dtype of v."""
    b, h, n, d = q.shape
    if n != geometry.n:
        raise ValueError(f"q has {n} tokens, the geometry {geometry} has {geometry.n}")
    index = local_index(geometry, tile=tile, radius=radius)
    query, key, key_valid = (index_to(x, q.device) for x in index)
    out = q.new_empty((b, h, n + 1, d), dtype=torch.float32)  # row n collects the padded query slots
    n_text = geometry.n_text
    if n_text:
        out[:, :, :n_text] = F.scaled_dot_product_attention(q[:, :, :n_text].float(), k.float(), v.float())
    tiles, slots = query.shape
    width = key.shape[1]
    per_tile = b * h * (slots * d + 2 * width * d + slots * width)
    chunk = max(1, chunk_elements // per_tile)
    for s in range(0, tiles, chunk):
        qi, ki = query[s : s + chunk], key[s : s + chunk]  # [c, t^2], [c, K]
        c = qi.shape[0]
        qg = q[:, :, qi.clamp(max=n - 1)].float().reshape(b, h * c, slots, d)
        kg = k[:, :, ki].float().reshape(b, h * c, width, d)
        vg = v[:, :, ki].float().reshape(b, h * c, width, d)
        mask = key_valid[s : s + chunk, None, :].expand(h, c, 1, width).reshape(1, h * c, 1, width)
        o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask)  # [B, H c, t^2, d]
        out.index_copy_(2, qi.reshape(-1), o.reshape(b, h, c * slots, d))
    return out[:, :, :n].to(v.dtype)


class WindowPlan(NamedTuple):
    """Gather plan of `local_attention_at` for the queries at some sequence positions.

    text_rows: [Nt] rows of the queries that are text tokens (they attend to every key);
    image_rows: [Ni] rows of the image queries; key, key_valid: [Ni, K] their window's key positions
    and validity (as `window_keys`)."""

    text_rows: torch.Tensor
    image_rows: torch.Tensor
    key: torch.Tensor
    key_valid: torch.Tensor

    def to(self, device: torch.device) -> WindowPlan:
        """The plan on `device`, every table copied without a stream sync (geometry.index_to)."""
        return WindowPlan(*(index_to(x, device) for x in self))


def window_plan(geometry: TokenGeometry, positions: torch.Tensor, *, tile: int, radius: int) -> WindowPlan:
    """The gather plan (CPU tensors) of queries at sequence `positions` [Nq]. Positions on a device
    are read back once; pass CPU positions where the caller has them (the gates' probes)."""
    positions = positions.to("cpu")
    n_text, cols = geometry.n_text, geometry.cols
    text = (positions < n_text).nonzero().flatten()
    image = (positions >= n_text).nonzero().flatten()
    pos = positions[image] - n_text
    tiles_c = math.ceil(cols / tile)
    tile_id = ((pos // cols) // tile) * tiles_c + (pos % cols) // tile  # [n_img_q]
    needed, which = torch.unique(tile_id, return_inverse=True)
    key, key_valid = window_keys(geometry, needed, tile=tile, radius=radius)
    return WindowPlan(text, image, key[which], key_valid[which])


def window_mask(plan: WindowPlan, nq: int, n: int) -> torch.Tensor:
    """Dense [Nq, N] mask of a plan (True: the query attends to the key): text queries see every key,
    image queries their window's valid keys."""
    mask = torch.zeros(nq, n, dtype=torch.bool)
    mask[plan.text_rows] = True
    rows = plan.image_rows[:, None].expand_as(plan.key)
    mask[rows[plan.key_valid], plan.key[plan.key_valid]] = True
    return mask


def local_attention_at(
    q_sub: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    geometry: TokenGeometry,
    positions: torch.Tensor,
    *,
    tile: int,
    radius: int,
    chunk_elements: int = CHUNK_ELEMENTS,
    mask_elements: int = MASK_ELEMENTS,
) -> torch.Tensor:
    """Local-window softmax of queries q_sub [B, H, Nq, d] sitting at sequence `positions` [Nq] over the
    keys k, v [B, H, N, d] -> [B, H, Nq, d] fp32: row i equals local_attention(q)[:, :, positions[i]]
    when q_sub[:, :, i] = q[:, :, positions[i]] (same window, same masked softmax).

    Few queries over few keys (Nq x N <= mask_elements: the gates' 64 probes up to ~32K tokens)
    take one masked attention over every key, which reads k and v once; gathering each query's own
    window instead copies its ~1,000 keys per query and head (6 ms for Flux's 64 probes at any
    size). Past that the dense scores cost more than the gather, and the windows are gathered in
    chunks, so memory stays bounded. The plan's index tables go to the device once, without a
    stream sync."""
    b, h, nq, d = q_sub.shape
    if k.shape[2] != geometry.n or positions.shape != (nq,):
        raise ValueError(
            f"local_attention_at needs k with geometry.n = {geometry.n} tokens and one position per query, "
            f"got k {tuple(k.shape)}, q_sub {tuple(q_sub.shape)}, positions {tuple(positions.shape)}"
        )
    plan = window_plan(geometry, positions, tile=tile, radius=radius)
    if nq * geometry.n <= mask_elements:
        mask = index_to(window_mask(plan, nq, geometry.n), k.device)
        return F.scaled_dot_product_attention(q_sub.float(), k.float(), v.float(), attn_mask=mask)
    return _gathered_windows(q_sub, k, v, plan.to(k.device), chunk_elements)


def _gathered_windows(
    q_sub: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: WindowPlan, chunk_elements: int
) -> torch.Tensor:
    """`local_attention_at` by gathering each image query's window keys, in chunks of queries."""
    b, h, nq, d = q_sub.shape
    out = q_sub.new_empty((b, h, nq, d), dtype=torch.float32)
    if len(plan.text_rows):
        out[:, :, plan.text_rows] = F.scaled_dot_product_attention(
            q_sub[:, :, plan.text_rows].float(), k.float(), v.float()
        )
    width = plan.key.shape[1]
    chunk = max(1, chunk_elements // (b * h * (2 * width * d + width + d)))
    for s in range(0, len(plan.image_rows), chunk):
        rows = plan.image_rows[s : s + chunk]
        ki, kv_ok = plan.key[s : s + chunk], plan.key_valid[s : s + chunk]  # [c, K]
        c = ki.shape[0]
        qg = q_sub[:, :, rows].float().reshape(b, h * c, 1, d)
        kg = k[:, :, ki].float().reshape(b, h * c, width, d)
        vg = v[:, :, ki].float().reshape(b, h * c, width, d)
        mask = kv_ok[None, :, None, :].expand(h, c, 1, width).reshape(1, h * c, 1, width)
        o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask)  # [B, H c, 1, d]
        out[:, :, rows] = o.reshape(b, h, c, d)
    return out
