"""TAEF2: the tiny autoencoder for the FLUX.2 latent space (madebyollin/taesd, MIT).

Implemented from the upstream architecture (madebyollin/taesd `taesd.py`; docs/vae.md): 32 latent
channels at 1/8 scale, all widths 64, images in [0, 1], raw latents (no shift or scale). The FLUX.2
variant adds a "pool" branch (1x1 conv, GroupNorm(4, 256), ReLU, 1x1 conv) to the three
lowest-resolution blocks of the encoder and the decoder. Module indices equal the keys of the
upstream .pth files, so a strict `load_state_dict` works after casting their fp16 tensors to float32.

The tile programs (`encoder_program`, `decoder_program`) are the same forward written as
generators for core/vae/tiled.py: the pool branch's GroupNorm is the only layer that needs the
whole image, and it yields a GroupNormPartial there.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from core.tiling.rect import Rect
from core.vae.tiled import TileProgram, group_norm_step, halo_radius

LATENT_CHANNELS = 32
WIDTH = 64
ENCODER_FILE = "taef2_encoder.pth"
DECODER_FILE = "taef2_decoder.pth"
ENCODER_SHA256 = "10a4e1021e89d7551eaf161352da8dbd0b1aa83872ae28b150c1df1ce2f147b6"
DECODER_SHA256 = "0a44a31e1ae59eb9dbf9359d24942fd3ef5928162c1800d97a28c61d51be0ab5"


def _conv(n_in: int, n_out: int, *, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)


class Clamp(nn.Module):
    """Soft clamp of raw latents to (-3, 3): tanh(x / 3) * 3."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """out = ReLU(conv(x) + skip(x)); with midblock_gn, x = x + pool(x) first (FLUX.2 variant)."""

    def __init__(self, n_in: int, n_out: int, *, midblock_gn: bool = False) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv(n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out)
        )
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()
        self.pool: nn.Sequential | None = None
        if midblock_gn:
            wide = 4 * n_in  # 256 for the 64-wide FLUX.2 blocks
            self.pool = nn.Sequential(
                nn.Conv2d(n_in, wide, 1, bias=False),
                nn.GroupNorm(4, wide),
                nn.ReLU(),
                nn.Conv2d(wide, n_in, 1, bias=False),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


class Taef2Encoder(nn.Sequential):
    """images [B, 3, H, W] in [0, 1] -> raw latents [B, 32, H/8, W/8]."""

    def __init__(self, latent_channels: int = LATENT_CHANNELS) -> None:
        def stage() -> list[nn.Module]:
            return [_conv(WIDTH, WIDTH, stride=2, bias=False), *(Block(WIDTH, WIDTH) for _ in range(3))]

        super().__init__(
            _conv(3, WIDTH),
            Block(WIDTH, WIDTH),
            *stage(),  # 2-5
            *stage(),  # 6-9
            _conv(WIDTH, WIDTH, stride=2, bias=False),  # 10
            *(Block(WIDTH, WIDTH, midblock_gn=True) for _ in range(3)),  # 11-13
            _conv(WIDTH, latent_channels),  # 14
        )


class Taef2Decoder(nn.Sequential):
    """raw latents [B, 32, h, w] -> images [B, 3, 8h, 8w], roughly in [0, 1] (not clamped)."""

    def __init__(self, latent_channels: int = LATENT_CHANNELS) -> None:
        def stage() -> list[nn.Module]:
            return [nn.Upsample(scale_factor=2), _conv(WIDTH, WIDTH, bias=False)]

        super().__init__(
            Clamp(),
            _conv(latent_channels, WIDTH),
            nn.ReLU(),
            *(Block(WIDTH, WIDTH, midblock_gn=True) for _ in range(3)),  # 3-5
            *stage(),  # 6-7
            *(Block(WIDTH, WIDTH) for _ in range(3)),  # 8-10
            *stage(),  # 11-12
            *(Block(WIDTH, WIDTH) for _ in range(3)),  # 13-15
            *stage(),  # 16-17
            Block(WIDTH, WIDTH),  # 18
            _conv(WIDTH, 3),  # 19
        )


# --- loading -------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verify_taef2_checksums(directory: str | Path) -> None:
    """Raise ValueError naming the file whose SHA-256 differs from upstream's (madebyollin/taesd @5cccb12)."""
    for name, expected in ((ENCODER_FILE, ENCODER_SHA256), (DECODER_FILE, DECODER_SHA256)):
        path = Path(directory) / name
        if not path.is_file():
            raise ValueError(f"{path} does not exist")
        actual = _sha256(path)
        if actual != expected:
            raise ValueError(f"{path} has SHA-256 {actual}, expected {expected}")


def _load_into(module: nn.Module, path: Path) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)


def load_taef2(directory: str | Path) -> tuple[Taef2Encoder, Taef2Decoder]:
    """The TAEF2 encoder and decoder in float32 on the CPU, in eval mode, checksums verified.

    directory: holds taef2_encoder.pth and taef2_decoder.pth (the repository's copy is models/taef2,
    resolved by runner/models.py).
    The conv weights are stored channels-last, which makes the convolutions (and so the
    activations) channels-last: about 1.45x faster on CPU (oneDNN), same values up to rounding.
    """
    root = Path(directory)
    verify_taef2_checksums(root)
    encoder, decoder = Taef2Encoder(), Taef2Decoder()
    _load_into(encoder, root / ENCODER_FILE)
    _load_into(decoder, root / DECODER_FILE)
    channels_last = torch.channels_last
    return encoder.to(memory_format=channels_last).eval(), decoder.to(memory_format=channels_last).eval()


# --- tile programs (core.vae.tiled) --------------------------------------------------------------


def layer_ops(layers: nn.Sequential) -> list[str]:
    """The spatial ops of an encoder or decoder for `halo_radius`."""
    ops: list[str] = []
    for layer in layers:
        if isinstance(layer, Block):
            ops += ["conv"] * 3
        elif isinstance(layer, nn.Conv2d):
            ops.append("down" if layer.stride == (2, 2) else "conv")
        elif isinstance(layer, nn.Upsample):
            ops.append("up")
    return ops


def _block_program(block: Block, x: torch.Tensor, core: Rect) -> TileProgram:
    if block.pool is not None:
        h = block.pool[0](x)
        h = yield from group_norm_step(h, core, block.pool[1])
        x = x + block.pool[3](block.pool[2](h))
    return block.fuse(block.conv(x) + block.skip(x))


def _sequential_program(layers: nn.Sequential, x: torch.Tensor, core: Rect) -> TileProgram:
    for layer in layers:
        if isinstance(layer, Block):
            x = yield from _block_program(layer, x, core)
            continue
        x = layer(x)
        if isinstance(layer, nn.Conv2d) and layer.stride == (2, 2):
            core = core.scale(1, 2)
        elif isinstance(layer, nn.Upsample):
            core = core.scale(2)
    return core.cut(x)


def encoder_program(encoder: Taef2Encoder, window: torch.Tensor, core: Rect) -> TileProgram:
    """Tile program of the encoder: window [B, 3, h, w] (origin on the /8 grid) -> core latents."""
    if window.shape[-2] % 8 or window.shape[-1] % 8:
        raise ValueError(f"encoder windows must be multiples of 8, got {tuple(window.shape[-2:])}")
    return _sequential_program(encoder, window, core)


def decoder_program(decoder: Taef2Decoder, window: torch.Tensor, core: Rect) -> TileProgram:
    """Tile program of the decoder: latent window [B, 32, h, w] -> core pixels [B, 3, 8 h_c, 8 w_c]."""
    return _sequential_program(decoder, window, core)


def encoder_halo(encoder: Taef2Encoder) -> int:
    """145 image pixels: the 3x3 convs at strides 1, 2, 4, 8 (see tests/test_tiled_vae.py)."""
    return halo_radius(layer_ops(encoder))


def decoder_halo(decoder: Taef2Decoder) -> int:
    """19 latent pixels."""
    return halo_radius(layer_ops(decoder))
