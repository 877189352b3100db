"""The local and landmark branches and the gated mix on the GPU, as drop-in equals of
`core.attention.local.local_attention`, `core.attention.landmarks.landmark_attention` and the mixing
in `core.attention.student.Student.forward` (kernels in triton_window.py and triton_mix.py).

The image queries of both softmax branches run in one window kernel (they share the text keys).
The text queries are dense attention: over every key for the local branch, over the L <= 1024
landmark keys for the landmark branch, which PyTorch's fused SDPA (FlashAttention) runs near the
GPU's matrix rate; they are 512 of Flux's 4,608-66,048 queries.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from core.attention.geometry import TokenGeometry, index_to
from core.attention.kernels import launch as lc
from core.attention.kernels import triton_mix, triton_window

LOG2E = 1.4426950408889634


class WindowBranches(NamedTuple):
    local: torch.Tensor  # [B, H, N, d]
    landmark: torch.Tensor  # [B, H, N, d]


def window_branches(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    geometry: TokenGeometry,
    landmarks: torch.Tensor,
    *,
    tile: int,
    radius: int,
    dot: torch.dtype,
    out_dtype: torch.dtype,
    interpret: bool = False,
    launch: lc.Launch = lc.WINDOW,
) -> WindowBranches:
    """The local-window and the landmark softmax of q, k, v [B, H, N, d], in `out_dtype`.

    landmarks: the landmark key indices (core.attention.landmarks.landmark_indices: the text tokens,
    then the image landmarks). Image queries: the window kernel; text queries: SDPA over every key
    (local) and over the landmark keys (landmark).
    """
    b, h, n, d = q.shape
    n_text = geometry.n_text
    if not (q.stride() == k.stride() == v.stride()):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    landmarks = index_to(landmarks, k.device)
    image = landmarks[n_text:]
    lk, lv = k.index_select(2, image).contiguous(), v.index_select(2, image).contiguous()  # [B, H, M, d]
    local = torch.empty((b, h, n, d), dtype=out_dtype, device=q.device)
    landmark = torch.empty((b, h, n, d), dtype=out_dtype, device=q.device)
    groups = math.ceil(geometry.rows / tile) * math.ceil(math.ceil(geometry.cols / tile) / launch.tiles)
    triton_window._window_kernel[(groups, b * h)](
        q, k, v, local, lk, lv, landmark, image.numel(), n_text, geometry.rows, geometry.cols, h,
        *q.stride()[:3], LOG2E / math.sqrt(d),
        DOT=lc.tl_dtype(dot), TILE=tile, RADIUS=radius, QT=launch.tiles, D=d, TEXT_BLOCK=launch.block,
        **launch.options(interpret),
    )  # fmt: skip
    if n_text:
        qt = q[:, :, :n_text]
        local[:, :, :n_text] = F.scaled_dot_product_attention(qt, k, v).to(out_dtype)
        kl, vl = k.index_select(2, landmarks), v.index_select(2, landmarks)
        landmark[:, :, :n_text] = F.scaled_dot_product_attention(qt, kl, vl).to(out_dtype)
    return WindowBranches(local, landmark)


def mix(
    local: torch.Tensor,
    kernel: torch.Tensor,
    landmark: torch.Tensor,
    modulation: torch.Tensor,
    gates: torch.Tensor,
    reference: torch.Tensor,
    *,
    n_text: int,
    alpha_max: float,
    dtype: torch.dtype,
    interpret: bool = False,
    launch: lc.Launch = lc.MIX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated mix of the three branches [B, H, N, d] -> (out in `dtype`, 0-d int32 non-finite flag).

    modulation: [B, 6] fp32, the conditioner's outputs; gates: [4, H] fp32 (logit_kernel,
    gamma_kernel, logit_landmark, gamma_landmark); reference: [B H, 2] fp32, the mean disagreement
    that normalises each query's (kernel, landmark), from the gate probes.
    """
    b, h, n, d = local.shape
    local, kernel, landmark = (x.contiguous() for x in (local, kernel, landmark))
    n_img = n - n_text
    delta = torch.empty((b * h, 2, n_img), dtype=torch.float32, device=local.device)
    triton_mix._disagreement_kernel[(math.ceil(n_img / launch.block), b * h)](
        local, kernel, landmark, modulation, delta, n, n_text, h, D=d, BLOCK=launch.block,
        **launch.options(interpret),
    )  # fmt: skip
    out = torch.empty((b, h, n, d), dtype=dtype, device=local.device)
    flag = torch.zeros((), dtype=torch.int32, device=local.device)
    triton_mix._mix_kernel[(math.ceil(n / launch.block), b * h)](
        local, kernel, landmark, modulation, delta, reference, gates, out, flag, n, n_text, h, alpha_max,
        D=d, BLOCK=launch.block, **launch.options(interpret),
    )  # fmt: skip
    return out, flag
