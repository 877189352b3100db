"""The denoiser and conditioning interfaces every sampler and tiler is written against.

A Backbone predicts the flow-matching velocity v ~ eps - x0 for a batch of latent views
[B, C, h, w] in model space (the VAE adapter does any shift and scale). It owns whatever the
architecture needs around that: packing into tokens, position ids, RoPE extension (DyPE) and
attention hooks. Samplers never see any of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from core.rope.spec import RopeSpec


@dataclass(frozen=True)
class Cond:
    """Text (or learned) conditioning, computed once per job and shared by every view.

    tokens: [S_txt, D_joint] token states (T5 for Flux.1; learned tokens for the reference model).
    pooled: [D_pooled] pooled vector (CLIP for Flux.1).
    guidance: the distilled-guidance scale for models with a guidance embedding, else None.
    """

    tokens: torch.Tensor
    pooled: torch.Tensor
    guidance: float | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype) -> Cond:
        return Cond(self.tokens.to(device, dtype), self.pooled.to(device, dtype), self.guidance)


@runtime_checkable
class Backbone(Protocol):
    """velocity(x [B, C, h, w], sigma [B], cond, rope) -> v [B, C, h, w] (dtype and device of x).

    step, view_ids, cfg: what attention routes are told about the call (core/models/flux.py)."""

    latent_channels: int
    native_size: int  # latent pixels per side of the training resolution (Flux.1: 128 = 1024 px / 8)
    patch_size: int  # latent pixels per token side (2 for Flux's 2x2 packing)

    def velocity(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: Cond,
        rope: RopeSpec | None = None,
        *,
        step: int | None = None,
        view_ids: tuple[int, ...] | None = None,
        cfg: float | None = None,
    ) -> torch.Tensor: ...


@runtime_checkable
class Vae(Protocol):
    """encode(images [B, 3, H, W] in [0, 1]) -> model-space latents [B, C, H/f, W/f]; decode inverts."""

    latent_channels: int
    scale_factor: int

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...
