"""Triton kernel of the local and the landmark branch for the image queries (core/attention/local.py,
core/attention/landmarks.py): exact softmax of each image query over every text key and the image
keys of its (2r + 1) x (2r + 1) window of t x t-token tiles (local), and over every text key and the
image landmarks (landmark).

One program per (group of QT horizontally adjacent query tiles, batch x head): its QT t^2 queries
are gathered from t image rows (raster order), and the keys are visited in blocks that are whole
tiles, so a block is t rows of t contiguous tokens and the sparsity is exact up to the group: a key
tile in the window of one tile of the group but not of another is masked for the other's queries.
A group of two tiles reads the text keys once for 128 queries instead of 64, at the price of
visiting (2r + 2) / (2 (2r + 1)) more window tiles per tile (4/3 at r = 1). (FlexAttention's block
masks cut contiguous ranges of the sequence, which in raster order would cover whole image rows and
visit about ten times the keys of a 24 x 24 window at 256 columns.) The text keys come first, in
blocks of TEXT_BLOCK. The
softmax is the online (streaming) form of FlashAttention (Dao et al. 2022): running maximum and sum
in fp32, exp2 with log2(e) folded into the scale, products on `DOT` operands with fp32
accumulation. Tiles outside the grid are not visited; slots of partial tiles are masked.

Both branches start with the same keys, the text tokens, so the online-softmax state after the text
blocks (running maximum, sum and weighted values) is the same for both: it is computed once, then
continued over the window's tiles for the local output and over the landmark blocks (gathered image
landmarks, contiguous) for the landmark output. That saves the text keys' products of one branch,
n_text / (n_text + landmarks) of the landmark branch's work.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _attend_block(acc, m_i, l_i, q, k, v, allowed, scale):
    """One online-softmax step: acc, m_i, l_i updated with the key block k, v [BK, D]; allowed [BQ, BK].

    A query with no allowed key so far keeps m = -inf; its update is taken against 0 so that it stays
    exactly zero instead of -inf - -inf = NaN."""
    s = tl.dot(q, tl.trans(k)) * scale  # [BQ, BK], log2 domain
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def _window_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    lk_ptr,
    lv_ptr,
    land_ptr,
    n_land,
    n_text,
    rows,
    cols,
    heads,
    stride_b,
    stride_h,
    stride_n,
    scale,
    DOT: tl.constexpr,
    TILE: tl.constexpr,
    RADIUS: tl.constexpr,
    QT: tl.constexpr,
    D: tl.constexpr,
    TEXT_BLOCK: tl.constexpr,
):
    group = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    tiles_r = tl.cdiv(rows, TILE)
    tiles_c = tl.cdiv(cols, TILE)
    groups_c = tl.cdiv(tiles_c, QT)
    ti = group // groups_c
    tj0 = (group % groups_c) * QT  # the group's first tile column
    od = tl.arange(0, D)
    base = b * stride_b + h * stride_h

    slot = tl.arange(0, QT * TILE * TILE)
    q_tc = tj0 + slot // (TILE * TILE)  # tile column of each query
    inner = slot % (TILE * TILE)
    q_r = ti * TILE + inner // TILE
    q_c = q_tc * TILE + inner % TILE
    q_ok = (q_r < rows) & (q_c < cols)
    q_n = n_text + q_r * cols + q_c
    q = tl.load(q_ptr + base + q_n[:, None] * stride_n + od[None, :], mask=q_ok[:, None], other=0.0).to(DOT)

    acc = tl.zeros((QT * TILE * TILE, D), dtype=tl.float32)
    m_i = tl.full((QT * TILE * TILE,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((QT * TILE * TILE,), dtype=tl.float32)

    t_off = tl.arange(0, TEXT_BLOCK)
    every = q_tc[:, None] >= 0  # [BQ, 1] all True
    for s in range(0, n_text, TEXT_BLOCK):
        n = s + t_off
        ok = n < n_text
        k = tl.load(k_ptr + base + n[:, None] * stride_n + od[None, :], mask=ok[:, None], other=0.0).to(DOT)
        v = tl.load(v_ptr + base + n[:, None] * stride_n + od[None, :], mask=ok[:, None], other=0.0).to(DOT)
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k, v, every & ok[None, :], scale)

    acc_t, m_t, l_t = acc, m_i, l_i  # the state after the text keys, shared by both branches
    k_slot = tl.arange(0, TILE * TILE)
    r_lo = tl.maximum(ti - RADIUS, 0)
    r_hi = tl.minimum(ti + RADIUS, tiles_r - 1)
    c_lo = tl.maximum(tj0 - RADIUS, 0)
    c_hi = tl.minimum(tj0 + QT - 1 + RADIUS, tiles_c - 1)
    for wr in range(r_lo, r_hi + 1):
        for wc in range(c_lo, c_hi + 1):
            k_r = wr * TILE + k_slot // TILE
            k_c = wc * TILE + k_slot % TILE
            ok = (k_r < rows) & (k_c < cols)
            n = n_text + k_r * cols + k_c
            k = tl.load(k_ptr + base + n[:, None] * stride_n + od[None, :], mask=ok[:, None], other=0.0).to(
                DOT
            )
            v = tl.load(v_ptr + base + n[:, None] * stride_n + od[None, :], mask=ok[:, None], other=0.0).to(
                DOT
            )
            near = tl.abs(q_tc - wc) <= RADIUS  # [BQ]: this key tile is in the query's window
            acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k, v, near[:, None] & ok[None, :], scale)

    row = bh * (n_text + rows * cols) + q_n
    out = acc / l_i[:, None]
    tl.store(out_ptr + row[:, None] * D + od[None, :], out.to(out_ptr.dtype.element_ty), mask=q_ok[:, None])

    acc, m_i, l_i = acc_t, m_t, l_t
    l_base = bh * n_land * D
    for s in range(0, n_land, TEXT_BLOCK):
        n = s + t_off
        ok = n < n_land
        k = tl.load(lk_ptr + l_base + n[:, None] * D + od[None, :], mask=ok[:, None], other=0.0).to(DOT)
        v = tl.load(lv_ptr + l_base + n[:, None] * D + od[None, :], mask=ok[:, None], other=0.0).to(DOT)
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k, v, every & ok[None, :], scale)
    out = acc / l_i[:, None]
    tl.store(land_ptr + row[:, None] * D + od[None, :], out.to(land_ptr.dtype.element_ty), mask=q_ok[:, None])
