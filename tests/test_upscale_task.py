"""The upscale task end to end on the tiny model: equivalences, determinism, resume, fallbacks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from PIL import Image

from core.models.loading import ModelSpec
from runner.context import JobArtifacts, JobContext, LocalModelPool
from runner.models import load_model
from tasks.upscale import run
from tasks.upscale_config import CoherenceConfig, OutputsConfig, TilingConfig, UpscaleConfig

pytestmark = pytest.mark.cpu
TINY = ModelSpec(kind="random", shape="tiny")
QUIET = OutputsConfig(phase_images=False, latent_stats=False, compare_bicubic=False, checkpoints=False)


@pytest.fixture(scope="module")
def model():
    return load_model(TINY, "cpu")


@pytest.fixture(scope="module")
def photo(tmp_path_factory, assets) -> str:
    """A 64 x 80 crop of a real photo (small, so the TAEF2 passes stay fast)."""
    path = tmp_path_factory.mktemp("img") / "crop.png"
    Image.open(assets / "images/eval/set5/bird.png").convert("RGB").crop((100, 100, 180, 164)).save(path)
    return str(path)


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
        skip=False,
        coherence=CoherenceConfig(dilated=False),
        outputs=QUIET,
    )
    return UpscaleConfig(**{**defaults, **kw})


def test_one_tile_covering_the_image_equals_the_untiled_step(model, photo, tmp_path):
    untiled, _ = upscale(model, base(photo, tiling=TilingConfig(method="none")), tmp_path / "a")
    one_tile, ctx = upscale(
        model, base(photo, tiling=TilingConfig(method="multidiffusion", tile=256)), tmp_path / "b"
    )
    assert ctx.artifacts.records["phase1"]["tiles"] == [[0, 0, 16, 20]]
    assert torch.equal(untiled.image, one_tile.image)


def test_batch_size_does_not_change_the_result(model, photo, tmp_path):
    cfg = base(photo, tiling=TilingConfig(method="mixture", tile=64, overlap=16))
    a, _ = upscale(model, cfg, tmp_path / "a", max_batch=1)
    b, _ = upscale(model, cfg, tmp_path / "b", max_batch=4)
    torch.testing.assert_close(a.image, b.image, rtol=0, atol=1e-5)


def test_exact_per_tile_denoise_with_equal_denoise_is_plain_img2img(model, photo, tmp_path):
    from tasks.upscale_config import QuadtreeConfig

    q = QuadtreeConfig(min_tile=32, denoise_min=0.8, denoise_max=0.8, threshold=1.0)
    quad = base(
        photo,
        tiling=TilingConfig(method="multidiffusion", layout="quadtree", tile=64, overlap=16, quadtree=q),
    )
    plain = base(
        photo,
        tiling=TilingConfig(
            method="multidiffusion",
            layout="quadtree",
            tile=64,
            overlap=16,
            quadtree=dataclasses.replace(q, variable_denoise=False),
        ),
    )
    a, ctx = upscale(model, quad, tmp_path / "a")
    b, _ = upscale(model, plain, tmp_path / "b")
    assert len(ctx.artifacts.records["phase1"]["tiles"]) > 1
    assert set(ctx.artifacts.records["phase1"]["tile_denoise"]) == {0.5}
    torch.testing.assert_close(a.image, b.image, rtol=0, atol=1e-6)


def test_full_progressive_job_is_deterministic_and_resumes(model, photo, tmp_path):
    cfg = base(
        photo,
        scale=4.0,
        phases=0,
        denoise=(0.6, 0.4),
        skip=True,
        coherence=CoherenceConfig(dilated=True, fft_blend=0.25),
        tiling=TilingConfig(method="multidiffusion", tile=64, overlap=16),
        outputs=OutputsConfig(phase_images=True, latent_stats=True, previews=True, compare_bicubic=True),
    )
    first, ctx = upscale(model, cfg, tmp_path / "a")
    again, _ = upscale(model, cfg, tmp_path / "b")
    assert torch.equal(first.image, again.image)
    rec = ctx.artifacts.records
    assert rec["plan"]["sizes"] == [[128, 160], [256, 320]]
    assert rec["phase2"]["dilated_factor"] == 2 and rec["phase2/refinement"]["blend_path"] == "fft"
    out = tmp_path / "a"
    for name in (
        "result.png",
        "bicubic.png",
        "comparison.png",
        "phase1/result.png",
        "phase2/latent_stats.json",
        "phase2/latent_stats.png",
        "checkpoints/phase.safetensors",
    ):
        assert (out / name).is_file(), name
    assert len(list((out / "phase1" / "previews").glob("*.png"))) == 4  # int(6 - 6 * 0.6) = 2: steps 2..5
    # Resume: keep only phase 1's checkpoint and run again; the result equals the uninterrupted one.
    from safetensors.torch import load_file, save_file

    state = load_file(str(out / "checkpoints/phase.safetensors"))
    assert int(state["phase"]) == 1
    resume_dir = tmp_path / "c"
    (resume_dir / "checkpoints").mkdir(parents=True)
    phase1 = upscale_phase1_state(model, cfg, tmp_path / "d")
    save_file(phase1, str(resume_dir / "checkpoints/phase.safetensors"))
    resumed, rctx = upscale(model, cfg, resume_dir)
    assert rctx.artifacts.records["resumed_from_phase"] == 1
    assert torch.equal(resumed.image, first.image)


def upscale_phase1_state(model, cfg, out):
    """The checkpoint an interrupted run leaves after phase 1 (run the one-phase prefix of the plan)."""
    from safetensors.torch import load_file

    one = dataclasses.replace(
        cfg,
        outputs=OutputsConfig(
            phase_images=False, latent_stats=False, compare_bicubic=False, checkpoints=True
        ),
    )
    ctx = JobContext(JobArtifacts(out), LocalModelPool(model))

    class StopAfterPhase1(Exception):
        pass

    real_save = ctx.save_tensors

    def save_then_stop(name, tensors):
        real_save(name, tensors)
        raise StopAfterPhase1

    ctx.save_tensors = save_then_stop
    with pytest.raises(StopAfterPhase1):
        run(one, ctx)
    state = load_file(str(out / "checkpoints/phase.safetensors"))
    # the fingerprint covers the whole config: write the full config's fingerprint
    from tasks.upscale import _fingerprint

    state["fingerprint"] = torch.tensor(list(_fingerprint(cfg).encode()), dtype=torch.uint8)
    return state


@pytest.mark.parametrize(
    "tiling",
    [
        TilingConfig(method="spot", tile=64),
        TilingConfig(method="spot", tile=64, spot_wrap=True, spot_mode="fibonacci"),
        TilingConfig(method="mixture", layout="quadtree", tile=64, overlap=16),
    ],
    ids=["spot", "spot-wrap-fibonacci", "quadtree-mixture"],
)
def test_tile_methods_run_and_record(model, photo, tmp_path, tiling):
    cfg = base(photo, tiling=tiling, outputs=OutputsConfig(phase_images=False, compare_bicubic=False))
    result, ctx = upscale(model, cfg, tmp_path)
    assert torch.isfinite(result.image).all()
    if tiling.layout == "quadtree":
        assert (tmp_path / "phase1/quadtree.json").is_file() and (
            tmp_path / "phase1/quadtree_overlay.png"
        ).is_file()


def test_comfy_compat_and_covariance_and_cleanup(model, photo, tmp_path):
    from tasks.upscale_config import CleanupConfig

    cleanup = CleanupConfig(enabled=True, denoise=0.2, steps=5)
    cfg = base(
        photo, noise_mode="comfy_compat", resize="covariance", denoise=(1.0,), skip=True, cleanup=cleanup
    )
    result, ctx = upscale(model, cfg, tmp_path)
    assert ctx.artifacts.records["cleanup"]["denoise"] == 0.2
    assert ctx.artifacts.records["phase1"]["noise_mode"] == "comfy_compat"
    assert torch.isfinite(result.image).all()


def test_odd_input_is_cropped_and_recorded(model, tmp_path):
    path = tmp_path / "odd.png"
    Image.new("RGB", (70, 45), (10, 200, 30)).save(path)
    result, ctx = upscale(model, base(str(path), tiling=TilingConfig(method="none")), tmp_path / "o")
    assert ctx.artifacts.fallbacks[0]["what"] == "input crop"
    assert result.image.shape == (1, 3, 80, 128)  # the 40 x 64 crop, x2


@pytest.mark.parametrize(("height", "width"), [(6, 10), (12, 20), (32, 48), (2, 2)])
def test_local_plans_of_small_latents_keep_whole_tokens(height, width):
    """Refinement passes run on small latents: tiles and overlaps stay even (whole 2x2 tokens)."""
    from core.rope.spec import RopeSpec
    from tasks.upscale_plans import build_local_plan

    for method in ("multidiffusion", "mixture", "spot"):
        local = build_local_plan(
            TilingConfig(method=method, tile=256, overlap=64), height=height, width=width, native_px=256,
            scale=8, steps=10, denoise=0.5, seed=0, rope=RopeSpec(), image=None,
            reference=torch.zeros(1, 4, height, width), sigmas=[1.0 - i / 10 for i in range(11)],
        )  # fmt: skip
        for t in local.tiles:
            assert t.h % 2 == 0 and t.w % 2 == 0 and t.y0 % 2 == 0 and t.x0 % 2 == 0, (method, t)


def test_inpaint_mask_keeps_the_outside_on_the_reference(model, photo, tmp_path):
    """Mask (white = regenerate) resized with the phase: where it is black, every step is pinned to
    the inversion trajectory, so the phase ends exactly on the resized input latent there."""
    from core.upscale.resize import resize_image

    mask = Image.new("L", (80, 64), 0)
    mask.paste(255, (40, 0, 80, 64))  # regenerate the right half only
    mask_path = tmp_path / "mask.png"
    mask.save(mask_path)
    cfg = base(photo, mask=str(mask_path), tiling=TilingConfig(method="none"))
    result, ctx = upscale(model, cfg, tmp_path / "o")
    pool = LocalModelPool(model)
    source = ctx.read_image(photo)
    u = pool.encode(resize_image(source, (128, 160), "bicubic"))
    latent = result.phases[0].latent
    assert torch.equal(latent[..., :, :8], u[..., :, :8])  # left half (latent columns 0-9; the edge blends)
    assert (latent[..., :, 12:] - u[..., :, 12:]).abs().mean() > 1e-2  # right half regenerated
