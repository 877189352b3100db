"""The built-in reference model: a small Flux.1-architecture denoiser on TAEF2 latents.

It is a diffusers `FluxTransformer2DModel` (so attention, RoPE, packing and the attention hooks are
exactly the Flux.1 code paths Tessera patches) with a small learned token set and pooled vector in
place of T5/CLIP: it generates unconditioned photo content at a native size of 256 x 256 px
(32 x 32 TAEF2 latent, 16 x 16 tokens). TAEF2 latents are standardised by their mean and std
(measured on the training crops), which the VAE adapter applies as shift and scale.

Folder layout (written by `save_reference`, read by `load_reference`):
    transformer/             diffusers save_pretrained output (config.json, safetensors shards)
    conditioning.safetensors tokens [n_tokens, joint_dim], pooled [pooled_dim]
    reference.json           latent_shift, latent_scale, native_size, vae
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from core.models.backbone import Cond
from core.models.build import build_seeded
from core.models.flux import FluxBackbone

REFERENCE_CONFIG: dict = dict(
    patch_size=1,
    in_channels=128,  # 32 TAEF2 channels x 2 x 2
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=64,
    num_attention_heads=6,
    joint_attention_dim=256,
    pooled_projection_dim=256,
    guidance_embeds=False,
    axes_dims_rope=(16, 24, 24),
)
REFERENCE_NATIVE_SIZE = 32  # latent pixels: 256 px / 8
REFERENCE_TOKENS = 4


class ReferenceDenoiser(nn.Module):
    """Transformer plus learned conditioning; `velocity` is differentiable (used for training)."""

    def __init__(self, transformer: nn.Module, n_tokens: int = REFERENCE_TOKENS) -> None:
        super().__init__()
        cfg = transformer.config
        self.backbone = FluxBackbone(transformer, native_size=REFERENCE_NATIVE_SIZE)
        self.tokens = nn.Parameter(torch.randn(n_tokens, cfg.joint_attention_dim) * 0.02)
        self.pooled = nn.Parameter(torch.zeros(cfg.pooled_projection_dim))

    @property
    def transformer(self) -> nn.Module:
        return self.backbone.transformer

    def cond(self) -> Cond:
        return Cond(self.tokens, self.pooled, None)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.backbone.velocity(x, sigma, self.cond())


def build_reference(seed: int = 0, config: dict | None = None) -> ReferenceDenoiser:
    """A freshly initialised reference denoiser (diffusers' own init, then the learned tokens, from one
    seeded stream; on the CPU in float32)."""
    from diffusers import FluxTransformer2DModel

    return build_seeded(
        lambda: ReferenceDenoiser(FluxTransformer2DModel(**(config or REFERENCE_CONFIG))), seed
    )


@dataclass(frozen=True)
class ReferenceMeta:
    latent_shift: float
    latent_scale: float
    native_size: int = REFERENCE_NATIVE_SIZE
    vae: str = "taef2"


def save_reference(
    model: ReferenceDenoiser,
    directory: str | Path,
    meta: ReferenceMeta,
    *,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: str = "12MB",
) -> None:
    """Write the model in the folder layout above, weights in `dtype`, sharded below max_shard_size."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    transformer = model.transformer
    original = next(transformer.parameters()).dtype
    transformer.to(dtype).save_pretrained(directory / "transformer", max_shard_size=max_shard_size)
    transformer.to(original)
    save_file(
        {"tokens": model.tokens.detach().to(dtype).cpu(), "pooled": model.pooled.detach().to(dtype).cpu()},
        str(directory / "conditioning.safetensors"),
    )
    (directory / "reference.json").write_text(json.dumps(meta.__dict__, indent=2) + "\n")


def load_reference(
    directory: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[FluxBackbone, Cond, ReferenceMeta]:
    """(backbone, learned conditioning, meta) from a folder written by save_reference."""
    from diffusers import FluxTransformer2DModel

    directory = Path(directory)
    if not (directory / "reference.json").is_file():
        raise FileNotFoundError(
            f"no reference model at {directory} "
            "(expected reference.json, transformer/, conditioning.safetensors)"
        )
    meta = ReferenceMeta(**json.loads((directory / "reference.json").read_text()))
    transformer = FluxTransformer2DModel.from_pretrained(str(directory / "transformer"), torch_dtype=dtype)
    transformer = transformer.to(device).eval().requires_grad_(False)
    tensors = load_file(str(directory / "conditioning.safetensors"))
    cond = Cond(tensors["tokens"].to(device, dtype), tensors["pooled"].to(device, dtype), None)
    return FluxBackbone(transformer, native_size=meta.native_size), cond, meta
