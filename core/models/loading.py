"""Which model a job uses, and building it: the reference model, Flux.1 from a hub id / directory /
single file, or random weights at a named shape (tests: "tiny"; benchmarks: "flux-dev").

`load_model` runs inside a model worker (it reads weight files and touches the device); the spec is
a frozen config that travels with the job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from core.flow.seeds import gaussian_noise
from core.models.backbone import Backbone, Cond, Vae

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FLUX_NATIVE_SIZE = 128  # 1024 px / 8
TINY_NATIVE_SIZE = 32

FLUX_VAE_CONFIG: dict = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
"""Flux.1's AutoencoderKL shape (the `vae/config.json` of FLUX.1-dev)."""


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """The model a job runs.

    kind: "reference" (the built-in small model, `path` = its folder or "" for the bundled one),
      "flux" (`path` = hub id, local diffusers directory or single .safetensors file), or
      "random" (random weights at `shape` "tiny" or "flux-dev"; compute equals the real model's).
    vae: "" = the kind's default (reference/tiny: TAEF2; flux: the pipeline's VAE; flux-dev random:
      a random AutoencoderKL of Flux's shape); "taef2" (a flux-dev random transformer then takes
      TAEF2's 32-channel latents); or a hub id / directory / file of an AutoencoderKL.
    dtype: "auto" = bfloat16 on CUDA, float32 on CPU.
    prompt / prompt_embeds: Flux conditioning (text through the pipeline's encoders, or a safetensors
      file with prompt_embeds and pooled_prompt_embeds); the reference model has learned tokens.
    """

    kind: Literal["reference", "flux", "random"] = "reference"
    path: str = ""
    shape: Literal["tiny", "flux-dev"] = "tiny"
    vae: str = ""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    prompt: str = ""
    prompt_embeds: str = ""
    guidance: float = 3.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("reference", "flux", "random"):
            raise ValueError(f"model.kind must be reference, flux or random, got {self.kind!r}")
        if self.shape not in ("tiny", "flux-dev"):
            raise ValueError(f"model.shape must be tiny or flux-dev, got {self.shape!r}")
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"model.dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.kind == "flux" and not self.path:
            raise ValueError("model.path is required for kind flux (hub id, diffusers directory or file)")
        if self.prompt and self.prompt_embeds:
            raise ValueError("set model.prompt or model.prompt_embeds, not both")
        if self.kind == "reference" and (self.prompt or self.prompt_embeds):
            raise ValueError("the reference model has learned conditioning: model.prompt must be empty")

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return DTYPES[self.dtype]


@dataclass
class LoadedModel:
    """A backbone, its VAE and a way to get the job's conditioning."""

    backbone: Backbone
    vae: Vae
    make_cond: Callable[[], Cond]


def _taef2_vae(device: torch.device, shift: float = 0.0, scale: float = 1.0) -> Vae:
    from core.vae.adapters import TinyVae
    from core.vae.taef2 import load_taef2

    encoder, decoder = load_taef2()
    return TinyVae(encoder.to(device).eval(), decoder.to(device).eval(), shift=shift, scale=scale)


def _kl_vae(source: str, device: torch.device, dtype: torch.dtype) -> Vae:
    from core.vae.adapters import load_kl_vae

    return load_kl_vae(source, dtype=dtype, device=device)


def _random_kl_vae(device: torch.device, dtype: torch.dtype, seed: int) -> Vae:
    from diffusers import AutoencoderKL

    from core.vae.adapters import KLVae

    with torch.device("meta"):
        vae = AutoencoderKL(**FLUX_VAE_CONFIG).to(dtype)
    vae = vae.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.normal_(0.0, fan_in**-0.5, generator=gen)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    return KLVae(vae.eval().requires_grad_(False))


def load_model(spec: ModelSpec, device: torch.device | str) -> LoadedModel:
    """Build the model of `spec` on `device` (called once per worker)."""
    from core.models.flux import (
        FLUX_DEV_CONFIG,
        FluxBackbone,
        build_random_flux,
        load_flux_transformer,
        tiny_flux_config,
    )

    device = torch.device(device)
    dtype = spec.torch_dtype(device)
    if spec.kind == "reference":
        from core.models.reference import load_reference

        backbone, cond, meta = load_reference(spec.path or None, dtype=dtype, device=device)
        vae = (
            _taef2_vae(device, meta.latent_shift, meta.latent_scale)
            if not spec.vae or spec.vae == "taef2"
            else (_kl_vae(spec.vae, device, dtype))
        )
        cpu_cond = Cond(cond.tokens.float().cpu(), cond.pooled.float().cpu(), None)
        return LoadedModel(backbone, vae, lambda: cpu_cond)

    if spec.kind == "random":
        if spec.shape == "tiny":
            latent_channels = 32  # TAEF2's latent: the tiny model runs on a real VAE
            config = tiny_flux_config(latent_channels)
            native = TINY_NATIVE_SIZE
        else:
            # Flux.1-dev compute on 16-channel latents (a random AutoencoderKL of Flux's shape), or on
            # TAEF2's 32 channels with vae "taef2": the same transformer cost, a far lighter VAE.
            config = {**FLUX_DEV_CONFIG, "in_channels": 128} if spec.vae == "taef2" else FLUX_DEV_CONFIG
            native = FLUX_NATIVE_SIZE
        if device.type == "cpu" and spec.shape == "tiny":
            # Tiny models build on the CPU with diffusers' own init under a forked, seeded RNG.
            from diffusers import FluxTransformer2DModel

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(spec.seed)
                transformer = FluxTransformer2DModel(**config).eval().requires_grad_(False)
            if dtype != torch.float32:
                transformer = transformer.to(dtype)
        else:
            transformer = build_random_flux(config, dtype=dtype, device=device, seed=spec.seed)
        backbone = FluxBackbone(transformer, native_size=native)
        if spec.vae == "taef2" or (spec.vae == "" and spec.shape == "tiny"):
            vae = _taef2_vae(device)
        elif spec.vae in ("", "random-kl"):
            vae = _random_kl_vae(device, dtype, spec.seed)
        else:
            vae = _kl_vae(spec.vae, device, dtype)
        cfg = transformer.config
        n_text = 512 if spec.shape == "flux-dev" else 8  # Flux.1 runs 512 T5 tokens
        rand_cond = Cond(
            gaussian_noise((n_text, cfg.joint_attention_dim), spec.seed + 1),
            gaussian_noise((cfg.pooled_projection_dim,), spec.seed + 2),
            spec.guidance if cfg.guidance_embeds else None,
        )
        return LoadedModel(backbone, vae, lambda: rand_cond)

    # Flux.1 from a hub id, a directory or a single file.
    transformer = load_flux_transformer(spec.path, dtype=dtype, device=device)
    backbone = FluxBackbone(transformer, native_size=FLUX_NATIVE_SIZE)
    vae_source = spec.vae or spec.path
    if Path(vae_source).is_file() and not spec.vae:
        raise ValueError(
            f"model.path {spec.path!r} is a single transformer file: set model.vae to the VAE's hub id, "
            "directory or file"
        )
    vae = _taef2_vae(device) if vae_source == "taef2" else _kl_vae(vae_source, device, dtype)
    guidance = spec.guidance if transformer.config.guidance_embeds else None

    def make_cond() -> Cond:
        if spec.prompt_embeds:
            from core.models.text import load_prompt_embeds

            return load_prompt_embeds(spec.prompt_embeds, guidance=guidance)
        from core.models.text import FluxTextEncoder

        return FluxTextEncoder(spec.path, dtype=dtype, device=device).encode(spec.prompt, guidance=guidance)

    return LoadedModel(backbone, vae, make_cond)
