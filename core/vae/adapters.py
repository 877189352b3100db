"""VAE adapters: the Vae protocol of core.models.backbone over TAEF2 and diffusers' AutoencoderKL.

Both map images [B, 3, H, W] in [0, 1] to model-space latents (z - shift) * scale, where z is the
raw VAE latent, and back (images clamped to [0, 1]). Both also expose the tile programs of
core/vae/tiled.py (`encode_program`, `decode_program`) and their receptive-field radii
(`encode_halo` in image pixels, `decode_halo` in latent pixels), so the tiled passes of
core/vae/lockstep.py, in process or over the pool, work on either.

Decisions:
- Device and dtype follow the module's parameters: inputs are moved and cast to them (after the
  [0, 1] -> [-1, 1] map and the shift/scale, done in float32), outputs come back as float32 on the
  module's device.
- encode is deterministic: AutoencoderKL's latent distribution is reduced to its mode (mean).
- Inference only: encode, decode and the programs run without autograd.
- diffusers is imported only when an AutoencoderKL is loaded (it takes seconds to import).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from core.tiling.rect import Rect
from core.vae import kl_programs, taef2
from core.vae.tiled import TileProgram, halo_radius

if TYPE_CHECKING:
    from diffusers import AutoencoderKL


@torch.no_grad()
def _then(program: TileProgram, finish: Callable[[torch.Tensor], torch.Tensor]) -> TileProgram:
    """Run a tile program without autograd and map its output (the adapter's shift/scale)."""
    return finish((yield from program))


class TinyVae:
    """TAEF2 (raw 32-channel latents at /8). The reference model standardises its latents by their
    mean and std: shift = mean, scale = 1 / std."""

    scale_factor = 8

    def __init__(
        self, encoder: taef2.Taef2Encoder, decoder: taef2.Taef2Decoder, shift: float = 0.0, scale: float = 1.0
    ) -> None:
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.encoder, self.decoder = encoder, decoder
        self.shift, self.scale = float(shift), float(scale)
        self.latent_channels = encoder[-1].out_channels
        self.encode_halo = taef2.encoder_halo(encoder)
        self.decode_halo = taef2.decoder_halo(decoder)

    def _place(self, x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
        p = next(module.parameters())
        return x.to(p.device, p.dtype)

    def _to_raw(self, latents: torch.Tensor) -> torch.Tensor:
        return self._place(latents.float() / self.scale + self.shift, self.decoder)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        z = self.encoder(self._place(images, self.encoder))
        return ((z.float() - self.shift) * self.scale).contiguous()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(self._to_raw(latents)).float().clamp(0.0, 1.0).contiguous()

    def encode_program(self, window: torch.Tensor, core: Rect) -> TileProgram:
        program = taef2.encoder_program(self.encoder, self._place(window, self.encoder), core)
        return _then(program, lambda z: ((z.float() - self.shift) * self.scale).contiguous())

    def decode_program(self, window: torch.Tensor, core: Rect) -> TileProgram:
        program = taef2.decoder_program(self.decoder, self._to_raw(window), core)
        return _then(program, lambda images: images.float().clamp(0.0, 1.0).contiguous())


class KLVae:
    """diffusers AutoencoderKL (Flux.1: 16 channels, shift 0.1159, scale 0.3611, from its config)."""

    def __init__(self, vae: AutoencoderKL) -> None:
        cfg = vae.config
        self.vae = vae
        self.latent_channels = int(cfg.latent_channels)
        self.scale_factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.shift = float(cfg.shift_factor) if cfg.shift_factor is not None else 0.0
        self.scale = float(cfg.scaling_factor)
        self.encode_halo = halo_radius(kl_programs.encoder_ops(vae))
        self.decode_halo = halo_radius(kl_programs.decoder_ops(vae))

    def _place(self, x: torch.Tensor) -> torch.Tensor:
        p = next(self.vae.parameters())
        return x.to(p.device, p.dtype)

    def _to_raw(self, latents: torch.Tensor) -> torch.Tensor:
        return self._place(latents.float() / self.scale + self.shift)

    def _to_model(self, z: torch.Tensor) -> torch.Tensor:
        return (z.float() - self.shift) * self.scale

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        z = self.vae.encode(self._place(images.float() * 2 - 1)).latent_dist.mode()
        return self._to_model(z)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.vae.decode(self._to_raw(latents)).sample
        return ((images.float() + 1) / 2).clamp(0.0, 1.0)

    def encode_program(self, window: torch.Tensor, core: Rect) -> TileProgram:
        program = kl_programs.encoder_program(self.vae, self._place(window.float() * 2 - 1), core)
        return _then(program, self._to_model)

    def decode_program(self, window: torch.Tensor, core: Rect) -> TileProgram:
        program = kl_programs.decoder_program(self.vae, self._to_raw(window), core)
        return _then(program, lambda images: ((images.float() + 1) / 2).clamp(0.0, 1.0))


def load_kl_vae(source: str | Path, *, dtype: torch.dtype, device: torch.device | str) -> KLVae:
    """An AutoencoderKL in eval mode from a hub id, a diffusers pipeline directory (its vae/
    subfolder), a bare AutoencoderKL directory (config.json), or a single .safetensors/.ckpt file."""
    from diffusers import AutoencoderKL

    path = Path(source)
    if path.is_file():
        if path.suffix not in (".safetensors", ".ckpt"):
            raise ValueError(f"single-file VAE must be .safetensors or .ckpt, got {path}")
        vae = AutoencoderKL.from_single_file(str(path), torch_dtype=dtype)
    elif path.is_dir():
        if (path / "vae").is_dir():
            vae = AutoencoderKL.from_pretrained(str(path), subfolder="vae", torch_dtype=dtype)
        elif (path / "config.json").is_file():
            vae = AutoencoderKL.from_pretrained(str(path), torch_dtype=dtype)
        else:
            raise ValueError(f"{path} holds neither a vae/ subfolder nor a config.json")
    else:
        vae = AutoencoderKL.from_pretrained(str(source), subfolder="vae", torch_dtype=dtype)
    vae = vae.to(device).eval().requires_grad_(False)
    return KLVae(vae)
