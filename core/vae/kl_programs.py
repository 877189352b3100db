"""Tile programs of diffusers' AutoencoderKL: its Encoder and Decoder forward as generators.

Mirrors diffusers 0.42.1 (autoencoders/vae.py Encoder/Decoder, resnet.py ResnetBlock2D,
downsampling.py Downsample2D, upsampling.py Upsample2D, attention_processor.py Attention with
AttnProcessor2_0) over the module's own submodules, for core.vae.tiled. Every GroupNorm yields a
GroupNormPartial; the mid-block self-attention yields its core tokens' keys and values and attends
each tile's queries to the keys of the whole image, so the tiled result stays exact. Flux.1's VAE
has that mid-block attention (one head of 512 channels at 1/8 resolution). Its receptive fields
(`encoder_ops` / `decoder_ops` through core.vae.tiled.halo_radius) are 108 image pixels for the
encoder and 18 latent pixels for the decoder.

Supported: DownEncoderBlock2D / UpDecoderBlock2D of ResnetBlock2D without time embedding, conv
down/upsamplers without norms, UNetMidBlock2D with or without attention, group-norm output. Other
options (temb, spatial norm, avg-pool downsampling, transposed-conv upsampling, qk norms) raise
NotImplementedError up front, when the program is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from core.tiling.rect import Rect
from core.vae.tiled import AttentionGlobal, AttentionPartial, TileProgram, group_norm_step

if TYPE_CHECKING:
    from diffusers import AutoencoderKL


def _unsupported(what: str) -> NotImplementedError:
    return NotImplementedError(f"AutoencoderKL tile programs do not support {what}")


def _check_resnet(resnet: nn.Module) -> None:
    from diffusers.models.resnet import ResnetBlock2D

    if not isinstance(resnet, ResnetBlock2D):
        raise _unsupported(f"{type(resnet).__name__} (spatial or ada-group norm resnets)")
    # "group" (the decoder's up blocks) and "default" reduce to a plain norm2 when temb is None
    if resnet.time_emb_proj is not None or resnet.time_embedding_norm == "scale_shift":
        raise _unsupported(f"resnets with a time embedding ({resnet.time_embedding_norm})")
    if resnet.upsample is not None or resnet.downsample is not None:
        raise _unsupported("resnets that resample")


def _check_attention(attn: nn.Module) -> None:
    if attn.spatial_norm is not None:
        raise _unsupported("attention with spatial norm")
    if attn.norm_q is not None or attn.norm_k is not None or attn.norm_cross is not None:
        raise _unsupported("attention with q/k or cross norms")
    if attn.is_cross_attention or attn.added_kv_proj_dim is not None:
        raise _unsupported("cross attention")


def _check_mid_block(mid: nn.Module) -> None:
    for resnet in mid.resnets:
        _check_resnet(resnet)
    for attn in mid.attentions:
        if attn is not None:
            _check_attention(attn)


def _check_common(coder: nn.Module, blocks: nn.ModuleList, block_type: type) -> None:
    if not isinstance(coder.conv_norm_out, nn.GroupNorm):
        raise _unsupported(f"conv_norm_out of type {type(coder.conv_norm_out).__name__}")
    _check_mid_block(coder.mid_block)
    for block in blocks:
        if type(block) is not block_type:
            raise _unsupported(f"{type(block).__name__} blocks")
        for resnet in block.resnets:
            _check_resnet(resnet)


def check_supported(vae: AutoencoderKL) -> None:
    """Raise NotImplementedError naming the first option the tile programs do not mirror."""
    from diffusers.models.unets.unet_2d_blocks import DownEncoderBlock2D, UpDecoderBlock2D

    if vae.training:
        raise _unsupported("training mode (dropout would differ per tile); call .eval()")
    _check_common(vae.encoder, vae.encoder.down_blocks, DownEncoderBlock2D)
    _check_common(vae.decoder, vae.decoder.up_blocks, UpDecoderBlock2D)
    for block in vae.encoder.down_blocks:
        for down in block.downsamplers or ():
            if not down.use_conv or down.norm is not None:
                raise _unsupported("downsamplers without a conv or with a norm")
    for block in vae.decoder.up_blocks:
        for up in block.upsamplers or ():
            if up.use_conv_transpose or not up.interpolate or up.norm is not None or not up.use_conv:
                raise _unsupported("upsamplers other than nearest x2 + conv")


# --- receptive field -----------------------------------------------------------------------------


def _conv_ops(conv: nn.Conv2d) -> list[str]:
    k = conv.kernel_size[0]
    if conv.stride != (1, 1) or conv.kernel_size != (k, k) or conv.padding != ((k - 1) // 2,) * 2:
        raise _unsupported(f"conv {conv}")
    return ["conv"] * ((k - 1) // 2)  # a 3x3 conv is one "conv" op, 1x1 none


def _resnet_ops(resnet: nn.Module) -> list[str]:
    return _conv_ops(resnet.conv1) + _conv_ops(resnet.conv2)


def encoder_ops(vae: AutoencoderKL) -> list[str]:
    """The encoder's spatial ops for core.vae.tiled.halo_radius."""
    enc = vae.encoder
    ops = _conv_ops(enc.conv_in)
    for block in enc.down_blocks:
        for resnet in block.resnets:
            ops += _resnet_ops(resnet)
        for down in block.downsamplers or ():
            ops.append("down_asym" if down.padding == 0 else "down")
    for resnet in enc.mid_block.resnets:
        ops += _resnet_ops(resnet)
    return ops + _conv_ops(enc.conv_out)


def decoder_ops(vae: AutoencoderKL) -> list[str]:
    """The decoder's spatial ops for core.vae.tiled.halo_radius."""
    dec = vae.decoder
    ops = _conv_ops(dec.conv_in)
    for resnet in dec.mid_block.resnets:
        ops += _resnet_ops(resnet)
    for block in dec.up_blocks:
        for resnet in block.resnets:
            ops += _resnet_ops(resnet)
        for up in block.upsamplers or ():
            ops += ["up", *_conv_ops(up.conv if up.name == "conv" else up.Conv2d_0)]
    return ops + _conv_ops(dec.conv_out)


# --- generator forward ---------------------------------------------------------------------------


def _resnet(resnet: nn.Module, x: torch.Tensor, core: Rect) -> TileProgram:
    """ResnetBlock2D without temb: (shortcut(x) + conv2(act(norm2(conv1(act(norm1(x))))))) / osf."""
    h = yield from group_norm_step(x, core, resnet.norm1)
    h = resnet.conv1(resnet.nonlinearity(h))
    h = yield from group_norm_step(h, core, resnet.norm2)
    h = resnet.conv2(resnet.dropout(resnet.nonlinearity(h)))
    skip = resnet.conv_shortcut(x) if resnet.conv_shortcut is not None else x
    return (skip + h) / resnet.output_scale_factor


def _attention(attn: nn.Module, x: torch.Tensor, core: Rect) -> TileProgram:
    """Spatial self-attention (AttnProcessor2_0) with the keys and values of the whole image."""
    residual = x
    b, c, h, w = x.shape
    if attn.group_norm is not None:
        x = yield from group_norm_step(x, core, attn.group_norm)
    q = attn.to_q(x.flatten(2).transpose(1, 2))  # [B, h*w, D]
    core_tokens = core.cut(x).flatten(2).transpose(1, 2)  # [B, N_core, C]
    reply = yield AttentionPartial(attn.to_k(core_tokens), attn.to_v(core_tokens))
    if not isinstance(reply, AttentionGlobal):
        raise TypeError(
            f"an AttentionPartial must be answered by AttentionGlobal, got {type(reply).__name__}"
        )
    heads = attn.heads
    d = q.shape[-1] // heads
    q = q.view(b, -1, heads, d).transpose(1, 2)  # [B, H, h*w, d]
    k = reply.k.to(q).view(b, -1, heads, d).transpose(1, 2)  # [B, H, N, d]
    v = reply.v.to(q).view(b, -1, heads, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    out = out.transpose(1, 2).reshape(b, -1, heads * d)
    out = attn.to_out[1](attn.to_out[0](out))
    out = out.transpose(1, 2).reshape(b, c, h, w)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


def _mid_block(mid: nn.Module, x: torch.Tensor, core: Rect) -> TileProgram:
    x = yield from _resnet(mid.resnets[0], x, core)
    for attn, resnet in zip(mid.attentions, mid.resnets[1:], strict=True):
        if attn is not None:
            x = yield from _attention(attn, x, core)
        x = yield from _resnet(resnet, x, core)
    return x


def _encoder_program(vae: AutoencoderKL, x: torch.Tensor, core: Rect) -> TileProgram:
    enc = vae.encoder
    x = enc.conv_in(x)
    for block in enc.down_blocks:
        for resnet in block.resnets:
            x = yield from _resnet(resnet, x, core)
        for down in block.downsamplers or ():
            if down.padding == 0:  # diffusers' asymmetric padding of the stride-2 conv
                x = F.pad(x, (0, 1, 0, 1))
            x = down.conv(x)
            core = core.scale(1, 2)
    x = yield from _mid_block(enc.mid_block, x, core)
    x = yield from group_norm_step(x, core, enc.conv_norm_out)
    x = enc.conv_out(enc.conv_act(x))
    if vae.quant_conv is not None:
        x = vae.quant_conv(x)
    mean = x[:, : x.shape[1] // 2]  # DiagonalGaussianDistribution.mode(): the mean channels
    return core.cut(mean)


def _decoder_program(vae: AutoencoderKL, z: torch.Tensor, core: Rect) -> TileProgram:
    dec = vae.decoder
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z)
    x = dec.conv_in(z)
    x = yield from _mid_block(dec.mid_block, x, core)
    for block in dec.up_blocks:
        for resnet in block.resnets:
            x = yield from _resnet(resnet, x, core)
        for up in block.upsamplers or ():
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            x = (up.conv if up.name == "conv" else up.Conv2d_0)(x)
            core = core.scale(2)
    x = yield from group_norm_step(x, core, dec.conv_norm_out)
    x = dec.conv_out(dec.conv_act(x))
    return core.cut(x)


def encoder_program(vae: AutoencoderKL, window: torch.Tensor, core: Rect) -> TileProgram:
    """Tile program: image window [B, 3, h, w] in [-1, 1] (module dtype) -> raw latent mean of the core."""
    check_supported(vae)
    return _encoder_program(vae, window, core)


def decoder_program(vae: AutoencoderKL, window: torch.Tensor, core: Rect) -> TileProgram:
    """Tile program: raw latent window [B, C, h, w] -> the core's pixels in [-1, 1] (unclamped)."""
    check_supported(vae)
    return _decoder_program(vae, window, core)
