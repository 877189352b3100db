"""The kernel branch on the GPU: fused Triton forward, and the backward a trainer needs.

Forward (core/attention/kernels/triton_feature_map.py): phi_k fused into the KV/z accumulation and
phi_q into the readout, so no N x F feature tensor is written. Same formula as
`core.attention.kernel.kernel_attention`, with the MLP's products on `dot`-dtype operands.

Backward (`KernelBranchFunction`): gradients for phi_q's and phi_k's parameters (the student's
trainable weights; q, k and v are captured activations and get none). With y_i = n_i / s_i,
n_i = KV^T f_i, s_i = max(f_i . z, eps), f = phi_q(q), and an output gradient g_i:

    df_i = (KV g_i - [f_i . z > eps] (y_i . g_i) z) / s_i
    dKV  = sum_i f_i g_i^T / s_i,     dz = -sum_i [f_i . z > eps] (y_i . g_i) f_i / s_i
    d phi_k(k_j) = dKV v_j + dz

The features are recomputed chunk by chunk in PyTorch with autograd through the MLP (the
activation-recomputation of FlashAttention's backward, Dao et al. 2022), so the backward's memory is
O(chunk x h) and never N x F; its matrix products run at the parameters' precision.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from core.attention.kernel import EPS, FeatureMap
from core.attention.kernels import launch as lc
from core.attention.kernels import triton_feature_map as tfm

WAVES = 4  # programs of the KV accumulation per multiprocessor, so a few heads still fill the GPU
BACKWARD_CHUNK = 8192  # tokens per chunk of the backward's recomputation


class KernelBranchOutput(NamedTuple):
    out: torch.Tensor  # [B, H, N, d] in the requested dtype
    min_denominator: torch.Tensor  # 0-d fp32


class FeatureWeights(NamedTuple):
    """phi's three layers, transposed and cast for the kernels: w [in, out] in the dot dtype, b fp32."""

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    w3: torch.Tensor
    b3: torch.Tensor


def linear_layers(phi: FeatureMap) -> list[nn.Linear]:
    return [m for m in phi.mlp if isinstance(m, nn.Linear)]


def feature_weights(phi: FeatureMap, dot: torch.dtype) -> FeatureWeights:
    """The kernels' copy of phi's weights (feature_depth 2: exactly three linear layers)."""
    layers = linear_layers(phi)
    if len(layers) != 3:
        raise ValueError(f"the fused feature map needs feature_depth 2 (3 linear layers), got {len(layers)}")
    parts: list[torch.Tensor] = []
    for layer in layers:
        parts += [layer.weight.detach().t().contiguous().to(dot), layer.bias.detach().float().contiguous()]
    return FeatureWeights(*parts)


def _sizes(w: FeatureWeights) -> tuple[int, int, int]:
    return w.w1.shape[0], w.w1.shape[1], w.w3.shape[1]  # D, HID, F


def accumulate_state(
    k: torch.Tensor, v: torch.Tensor, w: FeatureWeights, *, interpret: bool = False, launch: lc.Launch = lc.KV
) -> tuple[torch.Tensor, torch.Tensor]:
    """KV [B H, F, d] and z [B H, F] (fp32) over the keys k, v [B, H, Nk, d]."""
    b, h, n, d = k.shape
    _, hid, f = _sizes(w)
    blocks = math.ceil(n / launch.block)
    programs = 1 if interpret else WAVES * torch.cuda.get_device_properties(k.device).multi_processor_count
    per_split = math.ceil(blocks / max(1, min(blocks, math.ceil(programs / (b * h)))))
    splits = math.ceil(blocks / per_split)
    kv = k.new_empty((b * h, splits, f, d), dtype=torch.float32)
    z = k.new_empty((b * h, splits, f), dtype=torch.float32)
    tfm._kv_kernel[(splits, b * h)](
        k, v, kv, z, *w, n, h, *k.stride()[:3], *v.stride()[:3], per_split,
        DOT=lc.tl_dtype(w.w1.dtype), BLOCK=launch.block, D=d, HID=hid, F=f, CHUNK=launch.chunk,
        **launch.options(interpret),
    )  # fmt: skip
    return kv.sum(dim=1), z.sum(dim=1)


def read_out(
    q: torch.Tensor,
    kv: torch.Tensor,
    z: torch.Tensor,
    w: FeatureWeights,
    *,
    eps: float,
    out_dtype: torch.dtype = torch.float32,
    interpret: bool = False,
    launch: lc.Launch = lc.READOUT,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y [B, H, N, d] in out_dtype and the denominators phi_q(q).z [B, H, N] fp32."""
    b, h, n, d = q.shape
    _, hid, f = _sizes(w)
    out = q.new_empty((b, h, n, d), dtype=out_dtype)
    den = q.new_empty((b, h, n), dtype=torch.float32)
    tfm._readout_kernel[(math.ceil(n / launch.block), b * h)](
        q, kv, z, out, den, *w, n, h, *q.stride()[:3], eps,
        DOT=lc.tl_dtype(w.w1.dtype), BLOCK=launch.block, D=d, HID=hid, F=f, CHUNK=launch.chunk,
        **launch.options(interpret),
    )  # fmt: skip
    return out, den


class KernelBranchFunction(torch.autograd.Function):
    """Fused forward; backward to the parameters of phi_q and phi_k (passed after q, k, v)."""

    @staticmethod
    def forward(ctx, q, k, v, kv, z, phi_q, phi_k, dot, out_dtype, eps, interpret, *params):
        wq = feature_weights(phi_q, dot)
        out, den = read_out(q, kv, z, wq, eps=eps, out_dtype=out_dtype, interpret=interpret)
        ctx.save_for_backward(q, k, v, kv, z, out, den)
        ctx.mark_non_differentiable(den)
        ctx.phi = (phi_q, phi_k)
        ctx.eps = eps
        return out, den

    @staticmethod
    def backward(ctx, grad_out, _grad_den):
        q, k, v, kv, z, out, den = ctx.saved_tensors
        phi_q, phi_k = ctx.phi
        b, h, _, d = q.shape
        kv = kv.reshape(b, h, *kv.shape[1:])  # [B, H, F, d]
        z = z.reshape(b, h, -1)
        params_q, params_k = list(phi_q.parameters()), list(phi_k.parameters())
        grads_q = [torch.zeros_like(p) for p in params_q]
        grads_k = [torch.zeros_like(p) for p in params_k]
        d_kv, d_z = torch.zeros_like(kv), torch.zeros_like(z)
        for s in range(0, q.shape[2], BACKWARD_CHUNK):
            part = slice(s, s + BACKWARD_CHUNK)
            g, y, dn = grad_out[:, :, part].float(), out[:, :, part].float(), den[:, :, part]
            inv = 1.0 / dn.clamp_min(ctx.eps)  # [B, H, c]
            yg = torch.where(dn > ctx.eps, (y * g).sum(-1) * inv, 0.0)  # [B, H, c]
            with torch.enable_grad():
                f = phi_q(q[:, :, part])  # [B, H, c, F]
                df = (g @ kv.transpose(-1, -2)) * inv[..., None] - yg[..., None] * z[:, :, None]
                for acc, gp in zip(grads_q, torch.autograd.grad(f, params_q, df), strict=True):
                    acc += gp
            f = f.detach()
            d_kv += f.transpose(-1, -2) @ (g * inv[..., None])
            d_z -= (f * yg[..., None]).sum(dim=2)
        for s in range(0, k.shape[2], BACKWARD_CHUNK):
            part = slice(s, s + BACKWARD_CHUNK)
            with torch.enable_grad():
                f = phi_k(k[:, :, part])
                df = v[:, :, part].float() @ d_kv.transpose(-1, -2) + d_z[:, :, None]
                for acc, gp in zip(grads_k, torch.autograd.grad(f, params_k, df), strict=True):
                    acc += gp
        return (None,) * 11 + tuple(grads_q) + tuple(grads_k)


def kernel_branch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: FeatureMap,
    phi_k: FeatureMap,
    *,
    state: tuple[torch.Tensor, torch.Tensor] | None = None,
    dot: torch.dtype = torch.bfloat16,
    out_dtype: torch.dtype = torch.float32,
    eps: float = EPS,
    interpret: bool = False,
) -> KernelBranchOutput:
    """Fused kernel regression of q [B, H, N, d] over k, v [B, H, Nk, d]: out and the min denominator.

    state: (KV [B H, F, d], z [B H, F]) from `accumulate_state` over these k, v, if already computed."""
    if state is None:
        with torch.no_grad():
            state = accumulate_state(k, v, feature_weights(phi_k, dot), interpret=interpret)
    params = [*phi_q.parameters(), *phi_k.parameters()]
    out, den = KernelBranchFunction.apply(
        q, k, v, *state, phi_q, phi_k, dot, out_dtype, eps, interpret, *params
    )  # fmt: skip
    return KernelBranchOutput(out, den.min())
