"""Kernel branch: non-causal normalised kernel regression over all keys.

With a positive feature map phi, softmax attention's weights exp(q.k / sqrt(d)) are replaced by
phi_q(q).phi_k(k), and the output of query i is the Nadaraya-Watson estimate (test-time regression,
arXiv 2501.12352; linear attention, Katharopoulos et al. 2020, arXiv 2006.16236):

    KV = sum_j phi_k(k_j) v_j^T      (F x d)
    z  = sum_j phi_k(k_j)            (F)
    y_i = phi_q(q_i)^T KV / max(phi_q(q_i)^T z, eps)

The feature map is phi(x) = normalize_2(ELU(MLP(x)) + 1): ELU + 1 keeps every feature positive (so
the denominator is a sum of positive terms), the L2 normalisation bounds phi_q.phi_k to (0, 1].
The MLP is d -> h -> ... -> h -> F with h = max(d, 2F) and SiLU between layers; phi_q and phi_k
are separate networks shared by all heads of the layer.

The state is accumulated in fp32 over key chunks and read out over query chunks, so the features
of all keys never exist at once: memory is O(F d + chunk (F + d)) per (batch, head) beside q, k, v
and the output.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

KEY_CHUNK = 1024
QUERY_CHUNK = 1024
EPS = 1e-6


class FeatureMap(nn.Module):
    """phi(x) = normalize_2(ELU(MLP(x)) + 1): [..., d] -> [..., features], computed in fp32.

    depth: hidden layers of width h = max(d, 2 features); depth 2 is d -> h -> h -> F.
    """

    def __init__(self, head_dim: int, features: int, depth: int) -> None:
        super().__init__()
        hidden = max(head_dim, 2 * features)
        dims = [head_dim] + [hidden] * depth + [features]
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers.append(nn.SiLU())
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(x.to(self.mlp[0].weight.dtype)).float()
        return F.normalize(F.elu(y) + 1.0, dim=-1)


class KernelOutput(NamedTuple):
    out: torch.Tensor  # [B, H, N, d], dtype of v
    min_denominator: torch.Tensor  # 0-d fp32: the smallest phi_q(q).z before the eps floor


class KernelState(NamedTuple):
    """The keys' summary, fp32: KV = sum_j phi_k(k_j) v_j^T [B, H, F, d], z = sum_j phi_k(k_j) [B, H, F]."""

    kv: torch.Tensor
    z: torch.Tensor


def kernel_state(
    k: torch.Tensor, v: torch.Tensor, phi_k: nn.Module, *, key_chunk: int = KEY_CHUNK
) -> KernelState:
    """KV and z over the keys k and values v [B, H, Nk, d], accumulated over key chunks in fp32."""
    kv: torch.Tensor | None = None
    z: torch.Tensor | None = None
    for s in range(0, k.shape[2], key_chunk):
        fk = phi_k(k[:, :, s : s + key_chunk])  # [B, H, c, F] fp32
        vc = v[:, :, s : s + key_chunk].float()  # [B, H, c, d]
        kv_c = fk.transpose(-1, -2) @ vc  # [B, H, F, d]
        z_c = fk.sum(dim=2)  # [B, H, F]
        kv = kv_c if kv is None else kv + kv_c
        z = z_c if z is None else z + z_c
    if kv is None or z is None:
        raise ValueError("kernel attention needs at least one key")
    return KernelState(kv, z)


def kernel_readout(
    q: torch.Tensor,
    state: KernelState,
    phi_q: nn.Module,
    *,
    eps: float = EPS,
    query_chunk: int = QUERY_CHUNK,
) -> KernelOutput:
    """y_i = phi_q(q_i)^T KV / max(phi_q(q_i)^T z, eps) for q [B, H, Nq, d], over query chunks -> fp32."""
    outs, dens = [], []
    for s in range(0, q.shape[2], query_chunk):
        fq = phi_q(q[:, :, s : s + query_chunk])  # [B, H, c, F]
        den = fq @ state.z.unsqueeze(-1)  # [B, H, c, 1]
        outs.append((fq @ state.kv) / den.clamp_min(eps))
        dens.append(den.min())
    return KernelOutput(torch.cat(outs, dim=2), torch.stack(dens).min())


def kernel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: nn.Module,
    phi_k: nn.Module,
    *,
    eps: float = EPS,
    key_chunk: int = KEY_CHUNK,
    query_chunk: int = QUERY_CHUNK,
) -> KernelOutput:
    """Normalised kernel regression of q [B, H, N, d] over keys k and values v [B, H, Nk, d]."""
    state = kernel_state(k, v, phi_k, key_chunk=key_chunk)
    out = kernel_readout(q, state, phi_q, eps=eps, query_chunk=query_chunk)
    return KernelOutput(out.out.to(v.dtype), out.min_denominator)


def kernel_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, phi_q: nn.Module, phi_k: nn.Module, *, eps: float = EPS
) -> torch.Tensor:
    """The same formula in one piece (all features at once): what the chunked version is tested against."""
    fq, fk = phi_q(q), phi_k(k)
    num = fq @ (fk.transpose(-1, -2) @ v.float())
    den = fq @ fk.sum(dim=2).unsqueeze(-1)
    return (num / den.clamp_min(eps)).to(v.dtype)
