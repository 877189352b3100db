"""Generation from noise: the job type behind `task: generate` (text-to-image on Flux.1, the
reference model's unconditional samples).

    for seed in cfg.seeds:
        x = noise(seed)                              core/flow/generation.py: keyed by the seed alone
        x = sample_euler(model, x, sigmas)           one full-frame view per step, on the pool
        image = decode(x)                            tiled VAE above 512 px
        save seed_<seed>.png                         (result.png: the first seed's image)

The views go through `ctx.evaluate` like an upscale step's, so the image does not depend on the
number of workers, and an `attention:` block serves a students bundle to every forward (the runner
attaches it; job.json's `attention` records which layers served and how many calls fell back).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.flow.generation import generation_noise, generation_sigmas
from core.flow.sampling import StepInfo, sample_euler
from core.tiling.compose import compose_velocity
from core.tiling.views import FullFramePlan
from tasks.context import UpscaleContext
from tasks.generate_config import GenerateConfig

PATCH = 2  # latent pixels per token side (Flux's 2 x 2 packing)


@dataclass
class GenerateResult:
    images: dict[int, torch.Tensor]  # seed -> [1, 3, H, W] in [0, 1]
    latents: dict[int, torch.Tensor]  # seed -> [1, C, h, w]

    @property
    def image(self) -> torch.Tensor:
        """The first seed's image (result.png)."""
        return next(iter(self.images.values()))


def run(cfg: GenerateConfig, ctx: UpscaleContext) -> GenerateResult:
    f = ctx.vae_scale_factor
    height, width = cfg.pixel_size(ctx.native_size * f)
    h, w = height // f, width // f
    if h % PATCH or w % PATCH:
        raise ValueError(f"size {height}x{width} px is not a whole number of {PATCH * f} px tokens")
    sigmas = generation_sigmas(h, w, cfg.steps, patch=PATCH, mu=cfg.mu)
    ctx.record(
        "generate", {"size": [height, width], "latent": [h, w], "sigmas": sigmas, "seeds": list(cfg.seeds)}
    )
    model_fn = compose_velocity(FullFramePlan(cfg.rope), ctx.evaluate)
    result = GenerateResult({}, {})
    for seed in cfg.seeds:
        label = f"seed {seed}"
        x = generation_noise(ctx.latent_channels, h, w, seed)
        ctx.progress(label, 0, cfg.steps, unit="steps")
        with ctx.timer("denoise"):
            x = sample_euler(model_fn, x, sigmas, callback=lambda info, label=label: _step(ctx, label, info))
        with ctx.timer("decode"):
            image = ctx.decode(x, tile=cfg.vae_tile_px(height, width))
        ctx.save_image(f"seed_{seed}.png", image)
        result.images[seed], result.latents[seed] = image, x
    ctx.save_image("result.png", result.image)
    return result


def _step(ctx: UpscaleContext, label: str, info: StepInfo) -> None:
    ctx.progress(label, info.step + 1, info.steps, unit="steps")
    ctx.log_metrics({"sigma": info.sigma}, step=info.step)
