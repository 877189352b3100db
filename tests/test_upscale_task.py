"""The upscale task end to end on the tiny model: equivalences, determinism, resume, fallbacks."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image
from test_upscale_helpers import (
    base,
    encoded,
    geometry,
    photo_crop,
    pool_read,
    tiny_model,
    upscale,
)

from core.flow.schedules import get_sigmas
from core.rope.spec import RopeSpec
from core.upscale.skip_residual import SkipResidual
from runner.context import JobArtifacts, JobContext, LocalModelPool
from tasks.upscale import run
from tasks.upscale_config import CoherenceConfig, OutputsConfig, TilingConfig
from tasks.upscale_plans import build_local_plan

pytestmark = pytest.mark.cpu


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def photo(tmp_path_factory, assets) -> str:
    return photo_crop(tmp_path_factory, assets)


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
        denoise=(0.8,),
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
    assert set(ctx.artifacts.records["phase1"]["tile_denoise"]) == {0.8}
    torch.testing.assert_close(a.image, b.image, rtol=0, atol=1e-6)


def test_full_progressive_job_is_deterministic_and_resumes(model, photo, tmp_path):
    cfg = base(
        photo,
        scale=4.0,
        phases=0,
        denoise=(0.6, 0.4),
        skip_residual=SkipResidual(),
        coherence=CoherenceConfig(dilated="auto", fft_blend=0.25),
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
        "checkpoints/phase.pt",
    ):
        assert (out / name).is_file(), name
    assert len(list((out / "phase1" / "previews").glob("*.png"))) == 4  # 6 - ceil(6 * 0.6) = 2: steps 2..5
    # Resume: interrupt a run right after phase 1's checkpoint, run again; equal to the uninterrupted run.
    resume_dir = tmp_path / "c"
    ctx = JobContext(JobArtifacts(resume_dir), LocalModelPool(model))
    real_save = ctx.save_state

    def save_then_stop(name, state):
        real_save(name, state)
        raise KeyboardInterrupt  # the driver killed mid-job

    ctx.save_state = save_then_stop
    with pytest.raises(KeyboardInterrupt):
        run(cfg, ctx)
    state = ctx.load_state("checkpoints/phase.pt")
    assert state["next_phase"] == 1 and set(state["views_per_step"]) == {"phase1"}
    resumed, rctx = upscale(model, cfg, resume_dir)
    assert rctx.artifacts.records["resumed_from_phase"] == 1
    assert torch.equal(resumed.image, first.image)
    assert rctx.artifacts.records["views_per_step"] == rec["views_per_step"]


def test_checkpoint_of_other_settings_is_not_resumed(model, photo, tmp_path):
    cfg = base(photo, tiling=TilingConfig(method="none"), outputs=OutputsConfig(phase_images=False))
    upscale(model, dataclasses.replace(cfg, seed=1), tmp_path)
    result, ctx = upscale(model, cfg, tmp_path)
    assert "resumed_from_phase" not in ctx.artifacts.records
    assert [f["what"] for f in ctx.artifacts.fallbacks] == ["resume"]
    fresh, _ = upscale(model, cfg, tmp_path / "fresh")
    assert torch.equal(result.image, fresh.image)


# ------------------------------------------------------------------ the task against core, method by method
# The photo crop at x2 is a 16 x 20 latent; 6 steps at denoise 0.5 run steps 3..5 of get_sigmas(6, mu).
LATENT, STEPS, FIRST = (16, 20), 6, 3
ROPE = RopeSpec(method="yarn")  # UpscaleConfig's default


def sigmas6() -> list[float]:
    from core.flow.schedules import mu_for_tokens

    return get_sigmas(STEPS, mu_for_tokens(LATENT[0] * LATENT[1] // 4))


def direct(model, u, plan, *, seed=0, sigmas=None, first=FIRST, x=None, global_plan=None):
    """Euler from z'_{sigma_first} = (1 - sigma) u + sigma eps over `plan` with nothing after the
    steps: what a phase without skip residual, pinning or mask must compute."""
    from core.flow.sampling import sample_euler
    from core.flow.schedules import noise_to
    from core.flow.seeds import gaussian_noise
    from core.tiling.compose import compose_velocity

    sigmas = sigmas6() if sigmas is None else sigmas
    x = noise_to(u, gaussian_noise(u.shape, seed), sigmas[first]) if x is None else x
    model_fn = compose_velocity(plan, LocalModelPool(model).evaluate, global_plan=global_plan)
    return sample_euler(model_fn, x, sigmas[first:], first_step=first)


def spot(mode: str, wrap: bool):
    from core.flow.seeds import derive_seed
    from core.tiling.tile_plans import SpotPlan

    seed = derive_seed(0, "spot")
    return SpotPlan(*LATENT, tile=(8, 8), seed=seed, mode=mode, wrap=wrap, rope=ROPE, steps=STEPS)


def quadtree_tiles_of(photo: str):
    from core.tiling.quadtree import build_quadtree, quadtree_tiles
    from core.upscale.resize import resize_image

    image = resize_image(pool_read(photo), (128, 160), "bicubic")[0]
    leaves = build_quadtree(image, threshold=1.0, min_tile=32, align=16, max_tile=256)
    return quadtree_tiles(leaves, *LATENT, overlap=2, scale=8, align=2)


@pytest.mark.parametrize("method", ["spot", "spot-wrap-fibonacci", "quadtree-mixture"])
def test_tile_methods_compute_what_core_defines(model, photo, tmp_path, method):
    """The phase equals the core plan of its method run by hand, and differs from the nearest wrong
    method (a fixed grid for Spot, count weights for Mixture of Diffusers)."""
    from core.tiling.tile_plans import TilePlan
    from core.tiling.tiles import grid_tiles
    from tasks.upscale_config import QuadtreeConfig

    q = QuadtreeConfig(threshold=1.0, min_tile=32, variable_denoise=False)
    tiling, plan, wrong = {
        "spot": (TilingConfig(method="spot", tile=64), spot("random", False), None),
        "spot-wrap-fibonacci": (
            TilingConfig(method="spot", tile=64, spot_wrap=True, spot_mode="fibonacci"),
            spot("fibonacci", True),
            spot("fibonacci", False),
        ),
        "quadtree-mixture": (
            TilingConfig(method="mixture", layout="quadtree", tile=64, overlap=16, quadtree=q),
            TilePlan(quadtree_tiles_of(photo), method="mixture", height=16, width=20, rope=ROPE),
            TilePlan(quadtree_tiles_of(photo), method="multidiffusion", height=16, width=20, rope=ROPE),
        ),
    }[method]
    wrong = wrong or TilePlan(grid_tiles(*LATENT, tile=8, overlap=0), height=16, width=20, rope=ROPE)
    result, ctx = upscale(model, base(photo, tiling=tiling), tmp_path)
    phase = result.phases[0]
    assert torch.equal(phase.reference, encoded(model, photo, (128, 160)))
    assert torch.equal(phase.latent, direct(model, phase.reference, plan))
    assert not torch.allclose(phase.latent, direct(model, phase.reference, wrong), atol=1e-4)
    if method == "quadtree-mixture":
        assert (tmp_path / "phase1/quadtree.json").is_file()
        assert (tmp_path / "phase1/quadtree_overlay.png").is_file()


def test_comfy_compat_double_noises_then_lerps_toward_the_input(model, photo, tmp_path):
    """comfy_compat: x = noised(noised(u, n), sigma_0) with one eps, Euler, then (1 - w) y + w u with
    the stage strength w (one phase: skip_residual.phase_start)."""
    from core.flow.schedules import noise_to
    from core.flow.seeds import gaussian_noise
    from core.tiling.views import FullFramePlan
    from core.upscale.skip_residual import stage_skip

    skip = SkipResidual(phase_start=0.7, phase_end=0.05)
    tiling = TilingConfig(method="none")
    cfg = base(photo, noise_mode="comfy_compat", renoise=(0.35, 0.15), skip_residual=skip, tiling=tiling)
    result, ctx = upscale(model, cfg, tmp_path)
    u = result.phases[0].reference
    eps = gaussian_noise(u.shape, 0)
    x = noise_to(noise_to(u, eps, 0.35), eps, sigmas6()[FIRST])
    y = direct(model, u, FullFramePlan(ROPE), x=x)
    assert torch.equal(result.phases[0].latent, stage_skip(y, u, 0.7))
    assert ctx.artifacts.records["phase1"]["noise_mode"] == "comfy_compat"
    once = dataclasses.replace(cfg, noise_mode="flow_consistent", skip_residual=None)
    flow, _ = upscale(model, once, tmp_path / "f")
    assert not torch.allclose(flow.phases[0].latent, y, atol=1e-4)  # the double noising is real


def test_cleanup_is_a_plain_img2img_pass_on_the_last_result(model, photo, tmp_path):
    """Clean-up: the last phase's latent at cleanup.denoise with its own steps and the next seed on
    the stride; no skip residual and no dilated views even when the phases have them."""
    from core.flow.schedules import img2img_start, mu_for_tokens
    from core.flow.seeds import stage_seed
    from core.tiling.tile_plans import TilePlan
    from core.tiling.tiles import grid_tiles
    from tasks.upscale_config import CleanupConfig

    cfg = base(
        photo,
        skip_residual=SkipResidual(),
        coherence=CoherenceConfig(dilated=2),
        tiling=TilingConfig(method="multidiffusion", tile=64, overlap=16),
        cleanup=CleanupConfig(enabled=True, denoise=0.5, steps=4),
    )
    result, ctx = upscale(model, cfg, tmp_path)
    phase1, cleanup = result.phases
    assert torch.equal(cleanup.reference, phase1.latent)
    tiles = grid_tiles(*LATENT, tile=8, overlap=2)
    plan = TilePlan(tiles, height=16, width=20, rope=ROPE)
    sigmas, first = get_sigmas(4, mu_for_tokens(80)), img2img_start(4, 0.5)
    expected = direct(model, phase1.latent, plan, seed=stage_seed(0, 1), sigmas=sigmas, first=first)
    assert torch.equal(cleanup.latent, expected)
    rec = ctx.artifacts.records
    assert rec["phase1"]["dilated_factor"] == 2 and rec["cleanup"]["dilated_factor"] == 1
    assert rec["views_per_step"] == {"phase1": [len(tiles) + 4] * 3, "cleanup": [len(tiles)] * 2}


def test_rewind_reinverts_the_result_and_samples_the_tail_again(model, photo, tmp_path):
    """Iterative Mixer's rewind (0.5, 0.8) over 3 run steps: ranges from run steps 0, 1 and 2. Each
    later range re-noises the current result with fresh noise keyed (seed, "rewind", r)."""
    from core.flow.schedules import noise_to
    from core.flow.seeds import derive_seed, gaussian_noise
    from core.tiling.views import FullFramePlan

    cfg = base(photo, tiling=TilingConfig(method="none"), rewind=(0.5, 0.8))
    result, ctx = upscale(model, cfg, tmp_path)
    plain, _ = upscale(model, dataclasses.replace(cfg, rewind=(0.0, 0.0)), tmp_path / "plain")
    x, sigmas = plain.phases[0].latent, sigmas6()
    for r, start in ((1, 1), (2, 2)):
        eps = gaussian_noise(x.shape, derive_seed(0, "rewind", r))
        x = direct(
            model, x, FullFramePlan(ROPE), first=FIRST + start, x=noise_to(x, eps, sigmas[FIRST + start])
        )
    assert [list(r) for r in ctx.artifacts.records["phase1"]["rewinds"]] == [[0, 3], [1, 3], [2, 3]]
    assert result.phases[0].views_per_step == [1] * 6
    assert torch.equal(result.phases[0].latent, x)


def test_latent_lanczos_falls_back_and_says_so(model, photo, tmp_path):
    """resize: latent with lanczos on TAEF2's 32 channels runs bicubic and records the fallback."""
    cfg = base(photo, resize="latent", resize_method="lanczos", denoise=(0.0,))
    _, ctx = upscale(model, cfg, tmp_path)
    assert [f["what"] for f in ctx.artifacts.fallbacks] == ["phase1 latent resize"]


def test_odd_input_is_cropped_and_recorded(model, tmp_path):
    path = tmp_path / "odd.png"
    Image.new("RGB", (70, 45), (10, 200, 30)).save(path)
    result, ctx = upscale(model, base(str(path), tiling=TilingConfig(method="none")), tmp_path / "o")
    assert ctx.artifacts.fallbacks[0]["what"] == "input crop"
    assert result.image.shape == (1, 3, 80, 128)  # the 40 x 64 crop, x2


@pytest.mark.parametrize(("height", "width"), [(6, 10), (12, 20), (32, 48), (2, 2)])
def test_local_plans_of_small_latents_keep_whole_tokens(height, width):
    """Refinement passes run on small latents: tiles and overlaps stay even (whole 2x2 tokens)."""
    for method in ("multidiffusion", "mixture", "spot"):
        local = build_local_plan(
            TilingConfig(method=method, tile=256, overlap=64), geometry(height, width), image=None
        )
        for t in local.tiles:
            assert all(v % 2 == 0 for v in t.rect.as_list()), (method, t)


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


# ------------------------------------------------------------------------------ regressions (issue 10)


def half_mask(tmp_path) -> str:
    """Regenerate the right half of the 80 x 64 crop only (white = regenerate)."""
    mask = Image.new("L", (80, 64), 0)
    mask.paste(255, (40, 0, 80, 64))
    path = tmp_path / "mask.png"
    mask.save(path)
    return str(path)


def test_refinement_runs_half_the_phase_steps_from_its_denoise(model, photo, tmp_path):
    """Defect 1: the refinement pass runs max(1, steps // 2) steps of the phase's FULL schedule at
    denoise d (a schedule of int(K / d) steps, its last K run), so it never starts from pure noise."""
    from core.flow.schedules import get_sigmas, mu_for_tokens

    co = CoherenceConfig(dilated=0, fft_blend=0.25, fft_denoise=0.5)
    _, ctx = upscale(model, base(photo, steps=6, denoise=(0.5,), coherence=co), tmp_path)
    rec = ctx.artifacts.records["phase1/refinement"]
    assert rec["low"] == [8, 10] and rec["steps"] == 3  # 6 // 2, not (6 - 3) // 2 cut again by d
    assert rec["sigmas"] == get_sigmas(6, mu_for_tokens(8 * 10 // 4))[3:]
    assert rec["sigmas"][0] < 1.0


def test_mask_holds_through_the_fft_refinement(model, photo, tmp_path):
    """Defect 2: outside the mask the phase ends on its reference, also after the FFT blend."""
    co = CoherenceConfig(dilated=0, fft_blend=0.25)
    result, _ = upscale(model, base(photo, mask=half_mask(tmp_path), coherence=co), tmp_path / "o")
    u = encoded(model, photo, (128, 160))
    latent = result.phases[0].latent
    assert torch.equal(latent[..., :8], u[..., :8])
    assert (latent[..., 12:] - u[..., 12:]).abs().mean() > 1e-2


def test_mask_holds_in_the_cleanup_phase(model, photo, tmp_path):
    """Defect 2: the clean-up phase keeps the outside of the mask on its reference (phase 1's result)."""
    from tasks.upscale_config import CleanupConfig

    cleanup = CleanupConfig(enabled=True, denoise=0.5, steps=4)
    cfg = base(photo, mask=half_mask(tmp_path), tiling=TilingConfig(method="none"), cleanup=cleanup)
    result, _ = upscale(model, cfg, tmp_path / "o")
    phase1, last = result.phases
    assert torch.equal(last.latent[..., :8], phase1.latent[..., :8])
    assert (last.latent[..., 12:] - phase1.latent[..., 12:]).abs().mean() > 1e-3
