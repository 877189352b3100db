"""Loading models the way users point at them: a local Flux pipeline folder with precomputed prompt
embeddings, the built-in reference model, and the errors for paths that are not there."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from safetensors.torch import save_file

from core.models.flux import tiny_flux_config
from core.models.loading import ModelSpec, load_model
from core.models.text import load_prompt_embeds

pytestmark = pytest.mark.cpu


@pytest.fixture
def flux_folder(tmp_path):
    """A diffusers Flux pipeline layout with a tiny transformer (guidance-distilled, like dev) and VAE."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        FluxTransformer2DModel(**{**tiny_flux_config(4), "guidance_embeds": True}).save_pretrained(
            tmp_path / "pipe" / "transformer"
        )
        AutoencoderKL(
            block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
            use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1, scaling_factor=0.5,
        ).save_pretrained(tmp_path / "pipe" / "vae")  # fmt: skip
    embeds = tmp_path / "prompt.safetensors"
    save_file(
        {"prompt_embeds": torch.randn(1, 7, 32), "pooled_prompt_embeds": torch.randn(1, 32)}, str(embeds)
    )
    return tmp_path / "pipe", embeds


def test_flux_from_a_local_pipeline_folder_with_prompt_embeds(flux_folder):
    folder, embeds = flux_folder
    model = load_model(
        ModelSpec(kind="flux", path=str(folder), prompt_embeds=str(embeds), guidance=4.0), "cpu"
    )
    cond = model.make_cond()
    assert cond.tokens.shape == (7, 32) and cond.pooled.shape == (32,) and cond.guidance == 4.0
    assert model.backbone.latent_channels == 4 and model.backbone.native_size == 128
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        z = model.vae.encode(images)
        v = model.backbone.velocity(z, torch.tensor([0.5]), cond)
        out = model.vae.decode(z)
    assert z.shape == (1, 4, 16, 16) and v.shape == z.shape and out.shape == images.shape


def test_prompt_embeds_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.prompt_embeds"):
        load_prompt_embeds(str(tmp_path / "none.safetensors"), guidance=None)
    bad = tmp_path / "bad.safetensors"
    save_file({"something": torch.zeros(1)}, str(bad))
    with pytest.raises(ValueError, match="lacks \\['pooled_prompt_embeds', 'prompt_embeds'\\]"):
        load_prompt_embeds(str(bad), guidance=None)


def test_builtin_reference_model_loads_from_the_repository():
    model = load_model(ModelSpec(kind="reference"), "cpu")
    cond = model.make_cond()
    assert cond.tokens.shape == (4, 256) and cond.guidance is None
    assert model.backbone.latent_channels == 32 and model.backbone.native_size == 32
    assert model.vae.scale == pytest.approx(1 / 0.8367, rel=1e-3)  # latents standardised by their std
    params = sum(p.numel() for p in model.backbone.transformer.parameters())
    assert 10e6 < params < 25e6


def test_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no reference model"):
        load_model(ModelSpec(kind="reference", path=str(tmp_path)), "cpu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(ModelSpec(kind="flux", path=str(tmp_path / "nope")), "cpu")
    with pytest.raises(ValueError, match="model.path is required"):
        ModelSpec(kind="flux")
