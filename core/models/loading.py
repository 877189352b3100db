"""Which model a job uses, and building it: the reference model, Flux.1 from a hub id / directory /
single file, or random weights at a named shape (tests: "tiny"; benchmarks: "flux-dev").

`load_model` runs inside a model worker. It reads the weight files it is pointed at, but decides
nothing about where they are or how the model is placed: the runner passes the device, the dtype
and the folders of the weights a spec names implicitly (runner/models.py). The spec is a frozen
config that travels with the job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from core.flow.seeds import gaussian_noise
from core.models.backbone import Backbone, Cond
from core.models.build import build_random, build_seeded
from core.vae.tiled import TiledVae, VaeGeometry

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
    dtype: "auto" = bfloat16 on CUDA, float32 on CPU (the runner decides: runner/models.py).
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


@dataclass(frozen=True)
class WeightFolders:
    """Folders of the weights a spec names implicitly, resolved by the runner (runner/models.py):
    the built-in reference model (kind reference with path "") and TAEF2 (vae "" or "taef2")."""

    reference: str
    taef2: str


@dataclass(frozen=True)
class ModelMeta:
    """What a driver needs to know of a model it never holds: latent shape, native size, VAE geometry."""

    latent_channels: int
    native_size: int  # latent pixels per side of the training resolution
    vae: VaeGeometry


@dataclass
class LoadedModel:
    """A backbone, its VAE and a way to get the job's conditioning."""

    backbone: Backbone
    vae: TiledVae
    make_cond: Callable[[], Cond]

    @property
    def meta(self) -> ModelMeta:
        return ModelMeta(self.backbone.latent_channels, self.backbone.native_size, VaeGeometry.of(self.vae))


def _taef2_vae(folder: str, device: torch.device, shift: float = 0.0, scale: float = 1.0) -> TiledVae:
    from core.vae.adapters import TinyVae
    from core.vae.taef2 import load_taef2

    encoder, decoder = load_taef2(folder)
    return TinyVae(encoder.to(device).eval(), decoder.to(device).eval(), shift=shift, scale=scale)


def _vae(source: str, folders: WeightFolders, device: torch.device, dtype: torch.dtype) -> TiledVae:
    """TAEF2 for "taef2", else an AutoencoderKL from a hub id, directory or file."""
    if source == "taef2":
        return _taef2_vae(folders.taef2, device)
    from core.vae.adapters import load_kl_vae

    return load_kl_vae(source, dtype=dtype, device=device)


def _random_kl_vae(device: torch.device, dtype: torch.dtype, seed: int) -> TiledVae:
    from diffusers import AutoencoderKL

    from core.vae.adapters import KLVae

    return KLVae(build_random(AutoencoderKL, FLUX_VAE_CONFIG, dtype=dtype, device=device, seed=seed))


def load_model(
    spec: ModelSpec, *, device: torch.device | str, dtype: torch.dtype, folders: WeightFolders
) -> LoadedModel:
    """Build the model of `spec` on `device` in `dtype` (called once per worker). The VAE of the
    reference and tiny models (TAEF2) stays in float32: it is small and its outputs are float32."""
    device = torch.device(device)
    if spec.kind == "reference":
        return _reference_model(spec, device, dtype, folders)
    if spec.kind == "random":
        return _random_model(spec, device, dtype, folders)
    return _flux_model(spec, device, dtype, folders)


def _reference_model(
    spec: ModelSpec, device: torch.device, dtype: torch.dtype, folders: WeightFolders
) -> LoadedModel:
    from core.models.reference import load_reference

    backbone, cond, meta = load_reference(spec.path or folders.reference, dtype=dtype, device=device)
    if not spec.vae or spec.vae == "taef2":
        vae = _taef2_vae(folders.taef2, device, meta.latent_shift, meta.latent_scale)
    else:
        vae = _vae(spec.vae, folders, device, dtype)
    cpu_cond = Cond(cond.tokens.float().cpu(), cond.pooled.float().cpu(), None)
    return LoadedModel(backbone, vae, lambda: cpu_cond)


def _random_model(
    spec: ModelSpec, device: torch.device, dtype: torch.dtype, folders: WeightFolders
) -> LoadedModel:
    from diffusers import FluxTransformer2DModel

    from core.models.flux import FLUX_DEV_CONFIG, FluxBackbone, tiny_flux_config

    if spec.shape == "tiny":
        config, native = tiny_flux_config(32), TINY_NATIVE_SIZE  # TAEF2's latent: a real VAE
    else:
        # Flux.1-dev compute on 16-channel latents (a random AutoencoderKL of Flux's shape), or on
        # TAEF2's 32 channels with vae "taef2": the same transformer cost, a far lighter VAE.
        config = {**FLUX_DEV_CONFIG, "in_channels": 128} if spec.vae == "taef2" else FLUX_DEV_CONFIG
        native = FLUX_NATIVE_SIZE
    if device.type == "cpu" and spec.shape == "tiny":
        # diffusers' own init, seeded: the tiny model of the tests, the same in every process
        transformer = build_seeded(lambda: FluxTransformer2DModel(**config), spec.seed)
        if dtype != torch.float32:
            transformer = transformer.to(dtype)
        transformer = transformer.eval().requires_grad_(False)
    else:
        transformer = build_random(
            FluxTransformer2DModel, config, dtype=dtype, device=device, seed=spec.seed, std=0.02
        )
    if spec.vae == "taef2" or (spec.vae == "" and spec.shape == "tiny"):
        vae = _taef2_vae(folders.taef2, device)
    elif spec.vae in ("", "random-kl"):
        vae = _random_kl_vae(device, dtype, spec.seed)
    else:
        vae = _vae(spec.vae, folders, device, dtype)
    cfg = transformer.config
    n_text = 512 if spec.shape == "flux-dev" else 8  # Flux.1 runs 512 T5 tokens
    rand_cond = Cond(
        gaussian_noise((n_text, cfg.joint_attention_dim), spec.seed + 1),
        gaussian_noise((cfg.pooled_projection_dim,), spec.seed + 2),
        spec.guidance if cfg.guidance_embeds else None,
    )
    return LoadedModel(FluxBackbone(transformer, native_size=native), vae, lambda: rand_cond)


def _flux_model(
    spec: ModelSpec, device: torch.device, dtype: torch.dtype, folders: WeightFolders
) -> LoadedModel:
    """Flux.1 from a hub id, a directory or a single file."""
    from core.models.flux import FluxBackbone, load_flux_transformer

    transformer = load_flux_transformer(spec.path, dtype=dtype, device=device)
    backbone = FluxBackbone(transformer, native_size=FLUX_NATIVE_SIZE)
    vae_source = spec.vae or spec.path
    if Path(vae_source).is_file() and not spec.vae:
        raise ValueError(
            f"model.path {spec.path!r} is a single transformer file: set model.vae to the VAE's hub id, "
            "directory or file"
        )
    vae = _vae(vae_source, folders, device, dtype)
    guidance = spec.guidance if transformer.config.guidance_embeds else None

    def make_cond() -> Cond:
        if spec.prompt_embeds:
            from core.models.text import load_prompt_embeds

            return load_prompt_embeds(spec.prompt_embeds, guidance=guidance)
        from core.models.text import FluxTextEncoder

        return FluxTextEncoder(spec.path, dtype=dtype, device=device).encode(spec.prompt, guidance=guidance)

    return LoadedModel(backbone, vae, make_cond)
