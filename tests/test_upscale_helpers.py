"""Shared pieces of the upscale task tests (no tests here): the tiny model and a real photo crop as
the modules' fixtures, a config with the tests' defaults, and the in-process job runner."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from core.flow.schedules import get_sigmas
from core.models.loading import ModelSpec
from core.rope.spec import RopeSpec
from runner.context import JobArtifacts, JobContext, LocalModelPool
from runner.models import load_model
from tasks.upscale import run
from tasks.upscale_config import CoherenceConfig, OutputsConfig, UpscaleConfig
from tasks.upscale_plans import Geometry

TINY = ModelSpec(kind="random", shape="tiny")
QUIET = OutputsConfig(phase_images=False, latent_stats=False, compare_bicubic=False, checkpoints=False)


def tiny_model():
    return load_model(TINY, "cpu")


def photo_crop(tmp_path_factory, assets) -> str:
    """A 64 x 80 crop of a real photo (small, so the TAEF2 passes stay fast)."""
    path = tmp_path_factory.mktemp("img") / "crop.png"
    Image.open(assets / "images/eval/set5/bird.png").convert("RGB").crop((100, 100, 180, 164)).save(path)
    return str(path)


def geometry(height: int, width: int, *, native_px: int = 256, steps: int = 10) -> Geometry:
    """A latent of height x width on the tiny model's 8x VAE, 10 steps at denoise 0.5."""
    return Geometry(
        height=height, width=width, sigmas=get_sigmas(steps), denoise=0.5, seed=0, native_px=native_px,
        scale=8, rope=RopeSpec(),
    )  # fmt: skip


def upscale(model, cfg: UpscaleConfig, out: Path, max_batch: int = 4):
    ctx = JobContext(JobArtifacts(out), LocalModelPool(model, max_batch=max_batch))
    return run(cfg, ctx), ctx


def base(photo: str, **kw) -> UpscaleConfig:
    defaults = dict(
        model=TINY,
        image=photo,
        scale=2.0,
        phases=1,
        steps=6,
        denoise=(0.5,),
        skip_residual=None,
        coherence=CoherenceConfig(dilated=0),
        outputs=QUIET,
    )
    return UpscaleConfig(**{**defaults, **kw})


def encoded(model, photo: str, size: tuple[int, int]) -> torch.Tensor:
    """The pixel-resize phase input: the photo resized bicubically to `size` px, encoded."""
    from core.upscale.resize import resize_image

    pool = LocalModelPool(model)
    return pool.encode(resize_image(pool_read(photo), size, "bicubic"))


def pool_read(path: str) -> torch.Tensor:
    from runner.artifacts import read_image

    return read_image(path)
