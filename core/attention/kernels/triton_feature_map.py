"""Triton kernels of the kernel branch with the feature map phi fused in (core/attention/kernel.py).

phi(x) = normalize_2(ELU(MLP(x)) + 1) with the MLP d -> h -> h -> F (feature_depth 2, SiLU between)
is evaluated on a block of tokens in registers and shared memory and consumed at once, so the
features of the N tokens never reach device memory:

- `_kv_kernel`: one program per (split of the keys, batch x head) accumulates its split's partial
  state KV = sum_j phi_k(k_j) v_j^T (F x d) and z = sum_j phi_k(k_j) in fp32; the partials of the
  splits are summed afterwards (a few hundred KB), which keeps the grid large enough to fill the GPU
  without atomics.
- `_readout_kernel`: one program per (block of queries, batch x head) evaluates phi_q, then
  y_i = phi_q(q_i)^T KV / max(phi_q(q_i)^T z, eps), and writes y and the denominators.

The MLP's matrix products take operands in `dot` dtype (bf16 on the GPU) with fp32 accumulation;
biases, SiLU, ELU and the normalisation run in fp32. The hidden layer h2 is produced in chunks of
CHUNK columns, each chunk multiplied into the output layer at once, so only h1 (BLOCK x h), one
chunk of h2 and the F-wide output are live. The readout's product with KV runs on fp32 operands
(tf32 on the GPU).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _feature_map(
    x,
    w1_ptr,
    b1_ptr,
    w2_ptr,
    b2_ptr,
    w3_ptr,
    b3_ptr,
    BLOCK: tl.constexpr,
    D: tl.constexpr,
    HID: tl.constexpr,
    F: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """phi of x [BLOCK, D] (dot dtype) -> [BLOCK, F] fp32; w1 [D, HID], w2 [HID, HID], w3 [HID, F]."""
    od = tl.arange(0, D)
    oh = tl.arange(0, HID)
    of = tl.arange(0, F)
    oc = tl.arange(0, CHUNK)
    w1 = tl.load(w1_ptr + od[:, None] * HID + oh[None, :])
    h1 = tl.dot(x, w1) + tl.load(b1_ptr + oh)[None, :]
    h1 = (h1 * tl.sigmoid(h1)).to(x.dtype)
    y = tl.zeros((BLOCK, F), dtype=tl.float32)
    for c in range(0, HID, CHUNK):
        w2 = tl.load(w2_ptr + oh[:, None] * HID + (c + oc)[None, :])
        h2 = tl.dot(h1, w2) + tl.load(b2_ptr + c + oc)[None, :]
        h2 = (h2 * tl.sigmoid(h2)).to(x.dtype)
        w3 = tl.load(w3_ptr + (c + oc)[:, None] * F + of[None, :])
        y = tl.dot(h2, w3, y)
    y = y + tl.load(b3_ptr + of)[None, :]
    e = tl.where(y > 0, y + 1.0, tl.exp(y))  # ELU(y) + 1
    norm = tl.sqrt(tl.sum(e * e, axis=1))
    return e / tl.maximum(norm, 1e-12)[:, None]  # F.normalize's eps


@triton.jit
def _kv_kernel(
    k_ptr,
    v_ptr,
    kv_ptr,
    z_ptr,
    w1_ptr,
    b1_ptr,
    w2_ptr,
    b2_ptr,
    w3_ptr,
    b3_ptr,
    n_keys,
    heads,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    blocks_per_split,
    DOT: tl.constexpr,
    BLOCK: tl.constexpr,
    D: tl.constexpr,
    HID: tl.constexpr,
    F: tl.constexpr,
    CHUNK: tl.constexpr,
):
    split = tl.program_id(0)
    bh = tl.program_id(1)
    splits = tl.num_programs(0)
    b = bh // heads
    h = bh % heads
    od = tl.arange(0, D)
    of = tl.arange(0, F)
    rows = tl.arange(0, BLOCK)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    kv = tl.zeros((F, D), dtype=tl.float32)
    z = tl.zeros((F,), dtype=tl.float32)
    for i in range(0, blocks_per_split):
        n = (split * blocks_per_split + i) * BLOCK + rows
        valid = n < n_keys
        x = tl.load(k_base + n[:, None] * stride_kn + od[None, :], mask=valid[:, None], other=0.0)
        phi = _feature_map(x.to(DOT), w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, BLOCK, D, HID, F, CHUNK)
        phi = tl.where(valid[:, None], phi, 0.0)
        vv = tl.load(v_base + n[:, None] * stride_vn + od[None, :], mask=valid[:, None], other=0.0)
        kv = tl.dot(tl.trans(phi.to(DOT)), vv.to(DOT), kv)
        z += tl.sum(phi, axis=0)
    part = bh * splits + split
    tl.store(kv_ptr + part * F * D + of[:, None] * D + od[None, :], kv)
    tl.store(z_ptr + part * F + of, z)


@triton.jit
def _readout_kernel(
    q_ptr,
    kv_ptr,
    z_ptr,
    out_ptr,
    den_ptr,
    w1_ptr,
    b1_ptr,
    w2_ptr,
    b2_ptr,
    w3_ptr,
    b3_ptr,
    n_queries,
    heads,
    stride_qb,
    stride_qh,
    stride_qn,
    eps,
    DOT: tl.constexpr,
    BLOCK: tl.constexpr,
    D: tl.constexpr,
    HID: tl.constexpr,
    F: tl.constexpr,
    CHUNK: tl.constexpr,
):
    block = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    od = tl.arange(0, D)
    of = tl.arange(0, F)
    n = block * BLOCK + tl.arange(0, BLOCK)
    valid = n < n_queries
    x = tl.load(
        q_ptr + b * stride_qb + h * stride_qh + n[:, None] * stride_qn + od[None, :],
        mask=valid[:, None],
        other=0.0,
    )
    phi = _feature_map(x.to(DOT), w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, BLOCK, D, HID, F, CHUNK)
    kv = tl.load(kv_ptr + bh * F * D + of[:, None] * D + od[None, :])
    z = tl.load(z_ptr + bh * F + of)
    num = tl.dot(phi, kv)
    den = tl.sum(phi * z[None, :], axis=1)
    y = num / tl.maximum(den, eps)[:, None]
    row = bh * n_queries + n
    tl.store(out_ptr + row[:, None] * D + od[None, :], y.to(out_ptr.dtype.element_ty), mask=valid[:, None])
    tl.store(den_ptr + row, den, mask=valid)
