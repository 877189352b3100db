"""Loading models the way users point at them: a local Flux pipeline folder with precomputed prompt
embeddings, the built-in reference model, and the errors for paths that are not there."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from safetensors.torch import save_file

from core.models.build import build_seeded
from core.models.flux import tiny_flux_config
from core.models.loading import ModelSpec
from core.models.text import load_prompt_embeds
from runner.models import WEIGHTS, load_model, model_dtype

pytestmark = pytest.mark.cpu


@pytest.fixture
def flux_folder(tmp_path):
    """A diffusers Flux pipeline layout with a tiny transformer (guidance-distilled, like dev) and VAE."""
    config = {**tiny_flux_config(4), "guidance_embeds": True}
    build_seeded(lambda: FluxTransformer2DModel(**config), 0).save_pretrained(
        tmp_path / "pipe" / "transformer"
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
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


def test_the_runner_decides_dtype_and_default_folders():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert model_dtype(ModelSpec(), cuda) == torch.bfloat16 and model_dtype(ModelSpec(), cpu) == torch.float32
    assert model_dtype(ModelSpec(dtype="float16"), cpu) == torch.float16
    assert WEIGHTS.reference.endswith("models/reference") and WEIGHTS.taef2.endswith("models/taef2")
    model = load_model(ModelSpec(kind="random", shape="tiny", dtype="bfloat16"), "cpu")
    assert next(model.backbone.transformer.parameters()).dtype == torch.bfloat16
    assert next(model.vae.encoder.parameters()).dtype == torch.float32  # TAEF2 stays float32
    assert model.meta.vae.scale_factor == 8 and model.meta.latent_channels == 32


def test_seeded_builds_repeat_and_leave_the_rng_alone():
    from core.models.build import build_random

    config = tiny_flux_config(4)
    state = torch.random.get_rng_state()
    a = build_seeded(lambda: FluxTransformer2DModel(**config), 3)
    b = build_seeded(lambda: FluxTransformer2DModel(**config), 3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    r = build_random(FluxTransformer2DModel, config, dtype=torch.float32, device="cpu", seed=3)
    w = r.x_embedder.weight  # 16 inputs: std 1 / sqrt(16) = 0.25
    assert w.std().item() == pytest.approx(0.25, rel=0.2) and r.x_embedder.bias.abs().max() == 0
    assert not r.training and not w.requires_grad
    assert torch.equal(
        w,
        build_random(
            FluxTransformer2DModel, config, dtype=torch.float32, device="cpu", seed=3
        ).x_embedder.weight,
    )
