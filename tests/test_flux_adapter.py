"""The Flux backbone adapter: our block loop equals diffusers' forward, packing matches the pipeline,
DyPE leaves native-size views alone and changes larger ones, and loading from a local folder works."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel

from core.models.backbone import Cond
from core.models.build import build_seeded
from core.models.flux import (
    FluxBackbone,
    load_flux_transformer,
    pack_latents,
    tiny_flux_config,
    unpack_latents,
)
from core.rope.spec import RopeSpec

pytestmark = pytest.mark.cpu


def tiny(guidance: bool = False, channels: int = 4) -> FluxTransformer2DModel:
    cfg = {**tiny_flux_config(channels), "guidance_embeds": guidance}
    return build_seeded(lambda: FluxTransformer2DModel(**cfg), 0).eval()


def cond(model: FluxTransformer2DModel, guidance: float | None = None) -> Cond:
    g = torch.Generator().manual_seed(1)
    return Cond(
        torch.randn(5, model.config.joint_attention_dim, generator=g),
        torch.randn(model.config.pooled_projection_dim, generator=g),
        guidance,
    )


def test_pack_matches_diffusers_pipeline():
    from diffusers import FluxPipeline

    x = torch.randn(2, 4, 6, 8)
    ours = pack_latents(x)
    theirs = FluxPipeline._pack_latents(x, 2, 4, 6, 8)
    assert torch.equal(ours, theirs)
    assert torch.equal(unpack_latents(ours, 6, 8), x)


@pytest.mark.parametrize("guidance", [False, True])
def test_velocity_equals_transformer_forward(guidance):
    model = tiny(guidance)
    c = cond(model, 3.5 if guidance else None)
    backbone = FluxBackbone(model, native_size=32)
    x = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.7, 0.3])
    with torch.no_grad():
        ours = backbone.velocity(x, sigma, c)
        rows, cols = 4, 6
        img_ids = torch.zeros(rows, cols, 3)
        img_ids[..., 1] = torch.arange(rows)[:, None]
        img_ids[..., 2] = torch.arange(cols)[None, :]
        theirs = model(
            hidden_states=pack_latents(x),
            encoder_hidden_states=c.tokens.expand(2, -1, -1),
            pooled_projections=c.pooled.expand(2, -1),
            timestep=sigma,
            img_ids=img_ids.reshape(-1, 3),
            txt_ids=torch.zeros(5, 3),
            guidance=torch.full((2,), 3.5) if guidance else None,
            return_dict=False,
        )[0]
    assert torch.equal(ours, unpack_latents(theirs, 8, 12))


def test_dype_is_a_noop_within_native_and_acts_beyond():
    model = tiny()
    c = cond(model)
    backbone = FluxBackbone(model, native_size=8)  # native grid: 4 x 4 tokens
    spec = RopeSpec(method="yarn", dynamic=True)
    small = torch.randn(1, 4, 8, 8)
    big = torch.randn(1, 4, 16, 16)
    sigma = torch.tensor([0.8])
    with torch.no_grad():
        assert torch.equal(backbone.velocity(small, sigma, c, spec), backbone.velocity(small, sigma, c, None))
        plain = backbone.velocity(big, sigma, c, None)
        extended = backbone.velocity(big, sigma, c, spec)
    assert (plain - extended).abs().max() > 1e-4


def test_batch_of_views_equals_views_one_by_one():
    model = tiny()
    c = cond(model)
    backbone = FluxBackbone(model, native_size=32)
    x = torch.randn(3, 4, 8, 8)
    sigma = torch.tensor([0.9, 0.5, 0.1])
    with torch.no_grad():
        batched = backbone.velocity(x, sigma, c)
        single = torch.cat([backbone.velocity(x[i : i + 1], sigma[i : i + 1], c) for i in range(3)])
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)


def test_load_from_local_directory_and_pipeline_layout(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path / "flat")
    model.save_pretrained(tmp_path / "pipe" / "transformer")
    for source in (tmp_path / "flat", tmp_path / "pipe"):
        loaded = load_flux_transformer(str(source), dtype=torch.float32, device="cpu")
        for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
            assert torch.equal(a, b), name


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_flux_transformer(str(tmp_path / "nope"), dtype=torch.float32, device="cpu")


def test_wrong_channels_and_odd_sizes_raise():
    backbone = FluxBackbone(tiny(), native_size=32)
    c = cond(backbone.transformer)
    with pytest.raises(ValueError, match="channels"):
        backbone.velocity(torch.randn(1, 3, 8, 8), torch.tensor([0.5]), c)
    with pytest.raises(ValueError, match="even"):
        backbone.velocity(torch.randn(1, 4, 7, 8), torch.tensor([0.5]), c)
