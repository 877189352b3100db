"""Flux.1 backbone adapter over diffusers' `FluxTransformer2DModel`.

The adapter owns what the diffusers pipeline does around the transformer: 2x2 packing of the latent
into tokens, per-view position ids (each view gets local ids 0..rows-1, 0..cols-1, which is native for
Flux when the view is at most the training size), RoPE tables (plain, or extended by DyPE for views
larger than the native grid), timestep units (sigma in [0, 1]; the transformer multiplies by 1000)
and the guidance embedding.

Decision: we run the transformer's blocks in our own loop instead of calling its `forward`, so that
the RoPE tables (DyPE) and the attention routes' call context are ours to pass; the loop is the same
sequence of submodule calls as diffusers 0.42 `FluxTransformer2DModel.forward` (tested for equality).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from core.models.attention_hook import AttentionCall, is_routed, route_kwargs
from core.models.backbone import Cond
from core.rope.dype import dype_tables
from core.rope.spec import RopeSpec

ROPE_THETA = 10000.0


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C], channel order (C, dy, dx) as the Flux pipelines pack."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of pack_latents: [B, (h/2)(w/2), 4C] -> [B, C, h, w]."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


class FluxBackbone(nn.Module):
    """Backbone over a FluxTransformer2DModel whose input is a 2x2-packed latent of C channels.

    native_size: latent pixels per side at the model's training resolution (Flux.1: 128 = 1024 px / 8;
    the reference model: 32 = 256 px / 8). Views up to that size use plain RoPE whatever `rope` says.
    """

    patch_size = 2

    def __init__(self, transformer: nn.Module, *, native_size: int) -> None:
        super().__init__()
        cfg = transformer.config
        if cfg.patch_size != 1:
            raise ValueError(f"transformer.patch_size must be 1 (packing is done here), got {cfg.patch_size}")
        if cfg.in_channels % 4:
            raise ValueError(f"transformer.in_channels must be 4 x latent channels, got {cfg.in_channels}")
        self.transformer = transformer
        self.latent_channels = cfg.in_channels // 4
        self.native_size = native_size
        self.axes_dims: tuple[int, ...] = tuple(cfg.axes_dims_rope)
        self.has_guidance = bool(cfg.guidance_embeds)
        self._plain_rope: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def rope(
        self, rows: int, cols: int, n_text: int, sigma: float, spec: RopeSpec | None, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [n_text + rows*cols, head_dim]: text ids (zeros), then the image grid; DyPE
        extends an axis longer than the native grid (core/rope/dype.py), plain RoPE otherwise."""
        return dype_tables(
            rows,
            cols,
            axes_dims=self.axes_dims,
            sigma=sigma,
            spec=spec,
            base_patches=self.native_size // self.patch_size,
            theta=ROPE_THETA,
            text_tokens=n_text,
            device=device,
        )

    def rope_for(
        self,
        rows: int,
        cols: int,
        n_text: int,
        sigma: torch.Tensor,
        spec: RopeSpec | None,
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables on `device`. Plain tables (no extension, or a grid within the native size) are
        cached per grid, and sigma is read (a host sync) only for time-dependent DyPE."""
        native = self.native_size // self.patch_size
        plain = spec is None or spec.method == "none" or max(rows, cols) <= native
        if not plain:
            t = float(sigma.reshape(-1)[0]) if spec.dynamic else None
            return tuple(a.to(device) for a in self.rope(rows, cols, n_text, t, spec, device))  # type: ignore[return-value]
        key = (rows, cols, n_text, str(device))
        if key not in self._plain_rope:
            self._plain_rope[key] = tuple(
                a.to(device) for a in self.rope(rows, cols, n_text, None, None, device)
            )
        return self._plain_rope[key]  # type: ignore[return-value]

    def velocity(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: Cond,
        rope: RopeSpec | None = None,
        *,
        step: int | None = None,
        view_ids: Sequence[int] | None = None,
        cfg: float | None = None,
    ) -> torch.Tensor:
        """v [B, C, h, w] for views x [B, C, h, w] at flow times sigma [B].

        step, view_ids, cfg: call metadata for attention routes (core/models/attention_hook.py), read
        only when a route is attached; cfg defaults to cond.guidance.
        """
        b, c, h, w = x.shape
        if c != self.latent_channels:
            raise ValueError(f"latent has {c} channels, the model expects {self.latent_channels}")
        if h % 2 or w % 2:
            raise ValueError(f"view size must be even for 2x2 packing, got {h}x{w}")
        t = self.transformer
        param = next(t.parameters())
        dtype, device = param.dtype, param.device
        tokens = pack_latents(x.to(device=device, dtype=dtype))
        txt = cond.tokens.to(device=device, dtype=dtype).expand(b, -1, -1)
        pooled = cond.pooled.to(device=device, dtype=dtype).expand(b, -1)
        rows, cols = h // 2, w // 2
        cos, sin = self.rope_for(rows, cols, txt.shape[1], sigma, rope, device)

        hidden = t.x_embedder(tokens)
        timestep = sigma.to(device=device, dtype=hidden.dtype) * 1000
        if self.has_guidance:
            if cond.guidance is None:
                raise ValueError("this model has a guidance embedding: cond.guidance must be set")
            guidance = torch.full((b,), float(cond.guidance), device=device, dtype=hidden.dtype) * 1000
            temb = t.time_text_embed(timestep, guidance, pooled)
        else:
            temb = t.time_text_embed(timestep, pooled)
        encoder = t.context_embedder(txt)
        rotary = (cos, sin)
        call = None
        if is_routed(t):
            sig = sigma.reshape(-1).to(device=device, dtype=torch.float32).expand(b)
            ids = tuple(view_ids) if view_ids is not None else None
            guidance = cfg if cfg is not None else cond.guidance
            call = AttentionCall(txt.shape[1], rows, cols, sig, step, guidance, ids)
        for block in t.transformer_blocks:
            encoder, hidden = block(
                hidden_states=hidden,
                encoder_hidden_states=encoder,
                temb=temb,
                image_rotary_emb=rotary,
                joint_attention_kwargs=route_kwargs(block.attn, call),
            )
        for block in t.single_transformer_blocks:
            encoder, hidden = block(
                hidden_states=hidden,
                encoder_hidden_states=encoder,
                temb=temb,
                image_rotary_emb=rotary,
                joint_attention_kwargs=route_kwargs(block.attn, call),
            )
        hidden = t.norm_out(hidden, temb)
        out = t.proj_out(hidden)
        return unpack_latents(out, h, w).to(dtype=x.dtype, device=x.device)


def load_flux_transformer(source: str, *, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """A FluxTransformer2DModel from a single checkpoint file, a local diffusers directory (a whole
    pipeline with a `transformer/` folder, or the transformer folder itself) or a hub id."""
    from diffusers import FluxTransformer2DModel

    path = Path(source).expanduser()
    if path.is_file():
        model = FluxTransformer2DModel.from_single_file(str(path), torch_dtype=dtype)
    elif path.is_dir():
        sub = "transformer" if (path / "transformer").is_dir() else None
        model = FluxTransformer2DModel.from_pretrained(str(path), subfolder=sub, torch_dtype=dtype)
    elif path.is_absolute() or source.startswith("."):
        raise FileNotFoundError(f"model.path {source!r} does not exist")
    else:
        model = FluxTransformer2DModel.from_pretrained(source, subfolder="transformer", torch_dtype=dtype)
    return model.to(device).eval().requires_grad_(False)


FLUX_DEV_CONFIG: dict = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
"""The diffusers default configuration with guidance_embeds=True: the Flux.1-dev shape (11.9 B)."""


def tiny_flux_config(latent_channels: int) -> dict:
    """A ~0.1 M-parameter Flux for tests (one double and one single block, 2 heads x 16; a forward
    over 256 tokens takes milliseconds on a CPU), over `latent_channels`."""
    return dict(
        patch_size=1,
        in_channels=4 * latent_channels,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=False,
        axes_dims_rope=(4, 4, 8),
    )
