"""Triton kernels of the student's modulation, gates and mix (core/attention/{conditioner,gate}.py).

The gate of a branch normalises each query's disagreement by a reference mean per (batch, head),
computed beforehand from the gate probes (core/attention/student.py, `gate_probes`). Two passes:

- `_disagreement_kernel`: per image query, delta = 1 - cos(local, modulated branch) for the kernel
  and the landmark branch (fp32);
- `_mix_kernel`: per query, dbar = min(delta / reference, 3) / 3 (0 where the reference is 0),
  alpha = alpha_max sigmoid(logit + offset + gamma (dbar - 1/2)) for image queries and 0 for text
  queries, then y = (1 - alpha_k - alpha_l) local + alpha_k kernel' + alpha_l landmark', written in
  the output dtype; a flag records whether any output element is non-finite.

mod holds the conditioner's six outputs per batch item (scale and shift of the kernel and landmark
branches, then the two gate-logit offsets), in the order of core.attention.conditioner.Modulation.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_branches(local_ptr, kernel_ptr, landmark_ptr, mod_ptr, row, ok, b, D: tl.constexpr):
    od = tl.arange(0, D)
    offs = row[:, None] * D + od[None, :]
    a = tl.load(local_ptr + offs, mask=ok[:, None], other=0.0).to(tl.float32)
    kb = tl.load(kernel_ptr + offs, mask=ok[:, None], other=0.0).to(tl.float32)
    lb = tl.load(landmark_ptr + offs, mask=ok[:, None], other=0.0).to(tl.float32)
    kb = kb * (1.0 + tl.load(mod_ptr + b * 6 + 0)) + tl.load(mod_ptr + b * 6 + 1)
    lb = lb * (1.0 + tl.load(mod_ptr + b * 6 + 2)) + tl.load(mod_ptr + b * 6 + 3)
    return a, kb, lb


@triton.jit
def _one_minus_cos(a, b):
    na = tl.maximum(tl.sqrt(tl.sum(a * a, axis=1)), 1e-8)
    nb = tl.maximum(tl.sqrt(tl.sum(b * b, axis=1)), 1e-8)
    return 1.0 - tl.sum(a * b, axis=1) / (na * nb)


@triton.jit
def _disagreement_kernel(
    local_ptr, kernel_ptr, landmark_ptr, mod_ptr, delta_ptr, n, n_text, heads,
    D: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(1)
    n_img = n - n_text
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n_img
    a, kb, lb = _load_branches(
        local_ptr, kernel_ptr, landmark_ptr, mod_ptr, bh * n + n_text + i, ok, bh // heads, D
    )
    tl.store(delta_ptr + (bh * 2 + 0) * n_img + i, _one_minus_cos(a, kb), mask=ok)
    tl.store(delta_ptr + (bh * 2 + 1) * n_img + i, _one_minus_cos(a, lb), mask=ok)


@triton.jit
def _gate(delta, mean, logit, gamma, alpha_max, is_image):
    ratio = tl.where(mean > 0, delta / tl.maximum(mean, 1.1754943508222875e-38), 0.0)
    dbar = tl.minimum(ratio, 3.0) / 3.0
    alpha = alpha_max * tl.sigmoid(logit + gamma * (dbar - 0.5))
    return tl.where(is_image, alpha, 0.0)


@triton.jit
def _mix_kernel(
    local_ptr, kernel_ptr, landmark_ptr, mod_ptr, delta_ptr, mean_ptr, gates_ptr, out_ptr, flag_ptr,
    n, n_text, heads, alpha_max,
    D: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    n_img = n - n_text
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = t < n
    a, kb, lb = _load_branches(local_ptr, kernel_ptr, landmark_ptr, mod_ptr, bh * n + t, ok, b, D)
    is_image = t >= n_text
    i = tl.where(is_image, t - n_text, 0)
    dk = tl.load(delta_ptr + (bh * 2 + 0) * n_img + i, mask=ok & is_image, other=0.0)
    dl = tl.load(delta_ptr + (bh * 2 + 1) * n_img + i, mask=ok & is_image, other=0.0)
    # gates: [logit_kernel, gamma_kernel, logit_landmark, gamma_landmark] per head
    logit_k = tl.load(gates_ptr + 0 * heads + h) + tl.load(mod_ptr + b * 6 + 4)
    logit_l = tl.load(gates_ptr + 2 * heads + h) + tl.load(mod_ptr + b * 6 + 5)
    ak = _gate(
        dk, tl.load(mean_ptr + bh * 2 + 0), logit_k, tl.load(gates_ptr + 1 * heads + h), alpha_max, is_image
    )
    al = _gate(
        dl, tl.load(mean_ptr + bh * 2 + 1), logit_l, tl.load(gates_ptr + 3 * heads + h), alpha_max, is_image
    )
    y = (1.0 - ak - al)[:, None] * a + ak[:, None] * kb + al[:, None] * lb
    od = tl.arange(0, D)
    tl.store(
        out_ptr + (bh * n + t)[:, None] * D + od[None, :], y.to(out_ptr.dtype.element_ty), mask=ok[:, None]
    )
    bad = tl.where(ok[:, None], (y != y) | (tl.abs(y) == float("inf")), False)
    tl.atomic_max(flag_ptr, tl.max(tl.max(bad.to(tl.int32), axis=1), axis=0))
