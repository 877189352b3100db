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


# ------------------------------------------------------------------------------ regressions (issue 10)


def encoded(model, photo: str, size: tuple[int, int]) -> torch.Tensor:
    """The pixel-resize phase input: the photo resized bicubically to `size` px, encoded."""
    from core.upscale.resize import resize_image

    pool = LocalModelPool(model)
    return pool.encode(resize_image(pool_read(photo), size, "bicubic"))


def pool_read(path: str) -> torch.Tensor:
    from runner.artifacts import read_image

    return read_image(path)


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

    co = CoherenceConfig(dilated=False, fft_blend=0.25, fft_denoise=0.5)
    _, ctx = upscale(model, base(photo, steps=6, denoise=(0.5,), coherence=co), tmp_path)
    rec = ctx.artifacts.records["phase1/refinement"]
    assert rec["low"] == [8, 10] and rec["steps"] == 3  # 6 // 2, not (6 - 3) // 2 cut again by d
    assert rec["sigmas"] == get_sigmas(6, mu_for_tokens(8 * 10 // 4))[3:]
    assert rec["sigmas"][0] < 1.0


def test_mask_holds_through_the_fft_refinement(model, photo, tmp_path):
    """Defect 2: outside the mask the phase ends on its reference, also after the FFT blend."""
    co = CoherenceConfig(dilated=False, fft_blend=0.25)
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


def quadtree_cfg(photo: str, **quadtree) -> UpscaleConfig:
    from tasks.upscale_config import QuadtreeConfig

    q = QuadtreeConfig(**{"min_tile": 32, "threshold": 1.0, **quadtree})
    return base(
        photo, tiling=TilingConfig(method="mixture", layout="quadtree", tile=64, overlap=16, quadtree=q)
    )


def test_quadtree_denoise_range_is_the_configured_one(model, photo, tmp_path):
    """Defect 3: tiles run at d_min + (d_max - d_min)(1 - area / area_max) itself, not scaled by
    phase denoise / d_max; quadtree.json shows the values used."""
    import json

    a, ctx = upscale(model, quadtree_cfg(photo, denoise_min=0.2, denoise_max=0.8), tmp_path / "a")
    b, _ = upscale(model, quadtree_cfg(photo, denoise_min=0.1, denoise_max=0.4), tmp_path / "b")
    used = ctx.artifacts.records["phase1"]["tile_denoise"]
    assert len(set(used)) > 1 and min(used) == pytest.approx(0.2) and max(used) <= 0.8
    leaves = json.loads((tmp_path / "a/phase1/quadtree.json").read_text())
    assert [leaf["denoise"] for leaf in leaves] == pytest.approx(used)
    assert not torch.equal(a.image, b.image)


def test_legacy_criterion_splits_with_its_own_defaults():
    """Defect 4: unset threshold / min_tile mean the criterion's defaults (legacy: 0.03, 256 px)."""
    from core.rope.spec import RopeSpec
    from tasks.upscale_config import QuadtreeConfig
    from tasks.upscale_plans import build_local_plan

    image = torch.full((1, 3, 512, 512), 0.5)
    image[..., :256, :256] = (torch.arange(256)[:, None] + torch.arange(256)[None, :]) % 2
    tiling = TilingConfig(method="mixture", layout="quadtree", quadtree=QuadtreeConfig(criterion="legacy"))
    local = build_local_plan(
        tiling, height=64, width=64, native_px=512, scale=8, steps=10, denoise=0.5, seed=0,
        rope=RopeSpec(), image=image, reference=torch.zeros(1, 4, 64, 64),
        sigmas=[1.0 - i / 10 for i in range(11)],
    )  # fmt: skip
    assert len(local.leaves) == 4


@pytest.mark.parametrize("variable", [False, True], ids=["uniform", "variable"])
def test_cleanup_on_quadtree_covers_an_unaligned_target(model, photo, tmp_path, variable):
    """Defect 5: target 136 x 168 px (latent 18 x 22 after aligning up): the clean-up's quadtree
    must cover the whole latent, so the bottom and right strips are cleaned too."""
    from tasks.upscale_config import CleanupConfig, QuadtreeConfig

    q = QuadtreeConfig(min_tile=32, threshold=1.0, variable_denoise=variable)
    tiling = TilingConfig(method="multidiffusion", layout="quadtree", tile=64, overlap=0, quadtree=q)
    cleanup = CleanupConfig(enabled=True, denoise=0.5, steps=4)
    cfg = base(photo, scale=0.0, target=(136, 168), tiling=tiling, cleanup=cleanup)
    result, _ = upscale(model, cfg, tmp_path)
    phase1, last = result.phases
    assert last.latent.shape[-2:] == (18, 22)
    for strip in (
        last.latent[..., 16:, :] - phase1.latent[..., 16:, :],
        last.latent[..., 20:] - phase1.latent[..., 20:],
    ):
        assert strip.abs().amin(dim=(0, 1)).min() > 0  # every strip pixel was denoised


@pytest.mark.parametrize(
    "mode", [{"variable_denoise": False}, {"denoise_mode": "comfy_compat"}], ids=["uniform", "comfy_compat"]
)
def test_skip_diffusion_below_keeps_small_leaves_in_every_mode(model, photo, tmp_path, mode):
    """Defect 6: leaves smaller than skip_diffusion_below keep the input in every denoise mode (the
    exact per-tile mode already did; these two ran them)."""
    import json

    cfg = quadtree_cfg(photo, threshold=60.0, skip_diffusion_below=64, **mode)
    cfg = dataclasses.replace(cfg, tiling=dataclasses.replace(cfg.tiling, overlap=0))
    result, _ = upscale(model, cfg, tmp_path)
    u = encoded(model, photo, (128, 160))
    latent = result.phases[0].latent
    leaves = json.loads((tmp_path / "phase1/quadtree.json").read_text())
    small = [leaf for leaf in leaves if min(leaf["w"], leaf["h"]) < 64]
    assert small and len(small) < len(leaves)
    for leaf in leaves:
        ys = slice(leaf["y"] // 8, (leaf["y"] + leaf["h"]) // 8)
        xs = slice(leaf["x"] // 8, (leaf["x"] + leaf["w"]) // 8)
        kept = torch.equal(latent[..., ys, xs], u[..., ys, xs])
        assert kept == (leaf in small), leaf


def test_skip_diffusion_below_is_rejected_where_tiles_move():
    """Defect 6: Spot moves its windows every step, so no window is a leaf: a clear error."""
    from tasks.upscale_config import QuadtreeConfig

    q = QuadtreeConfig(variable_denoise=False, skip_diffusion_below=64)
    with pytest.raises(ValueError, match="skip_diffusion_below"):
        TilingConfig(method="spot", layout="quadtree", quadtree=q)


def test_covariance_resize_uses_resize_method(model, photo, tmp_path):
    """Defect 7: the covariance-aware resize honours resize_method (the latent is whitened, then
    resized with it)."""
    cfgs = [base(photo, resize="covariance", resize_method=m, denoise=(0.0,)) for m in ("nearest", "bicubic")]
    (a, _), (b, _) = (upscale(model, c, tmp_path / c.resize_method) for c in cfgs)
    assert not torch.equal(a.phases[0].latent, b.phases[0].latent)


def test_quadtree_leaves_are_capped_at_the_native_size():
    """Defect 8: a flat image gives one huge leaf unless leaves are capped (default: native size)."""
    from core.rope.spec import RopeSpec
    from tasks.upscale_config import QuadtreeConfig
    from tasks.upscale_plans import build_local_plan

    tiling = TilingConfig(method="mixture", layout="quadtree", quadtree=QuadtreeConfig())
    local = build_local_plan(
        tiling, height=128, width=128, native_px=256, scale=8, steps=10, denoise=0.5, seed=0,
        rope=RopeSpec(), image=torch.full((1, 3, 1024, 1024), 0.5), reference=torch.zeros(1, 4, 128, 128),
        sigmas=[1.0 - i / 10 for i in range(11)],
    )  # fmt: skip
    assert len(local.leaves) == 16
    assert max(max(leaf.w, leaf.h) for leaf in local.leaves) == 256


def test_covariance_resize_exposes_its_parameters(model, photo, tmp_path):
    """Defect 7: moment matching, shrinkage and the pixel sample reach `covariance_upscale`."""
    from core.flow.seeds import derive_seed, stage_seed
    from core.upscale.resize import CovarianceResize, covariance_upscale

    cov = CovarianceResize(moment_match=False, shrinkage=0.3, sample_pixels=50)
    cfg = base(photo, resize="covariance", resize_method="bilinear", covariance=cov, denoise=(0.0,))
    result, _ = upscale(model, cfg, tmp_path)
    source = LocalModelPool(model).encode(pool_read(photo))
    expected = covariance_upscale(
        source, (16, 20), method="bilinear", moment_match=False, shrinkage=0.3, sample_pixels=50,
        seed=derive_seed(stage_seed(0, 0), "covariance"),
    )  # fmt: skip
    assert torch.equal(result.phases[0].latent, expected)
    assert not torch.equal(expected, covariance_upscale(source, (16, 20), method="bilinear"))
