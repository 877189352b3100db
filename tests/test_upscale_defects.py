"""The upscale task's fixes of the original nodes' defects 3-8 (quadtree denoise range, legacy
criterion defaults, the clean-up's quadtree on unaligned targets, skip_diffusion_below, the
covariance resize's method and parameters, the leaf cap), on the tiny model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_upscale_helpers import (
    base,
    encoded,
    geometry,
    photo_crop,
    pool_read,
    tiny_model,
    upscale,
)

from runner.context import LocalModelPool
from tasks.upscale_config import TilingConfig, UpscaleConfig
from tasks.upscale_plans import build_local_plan

pytestmark = pytest.mark.cpu


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def photo(tmp_path_factory, assets) -> str:
    return photo_crop(tmp_path_factory, assets)


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
    from tasks.upscale_config import QuadtreeConfig

    image = torch.full((1, 3, 512, 512), 0.5)
    image[..., :256, :256] = (torch.arange(256)[:, None] + torch.arange(256)[None, :]) % 2
    tiling = TilingConfig(method="mixture", layout="quadtree", quadtree=QuadtreeConfig(criterion="legacy"))
    local = build_local_plan(tiling, geometry(64, 64, native_px=512), image=image)
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
    from tasks.upscale_config import QuadtreeConfig

    tiling = TilingConfig(method="mixture", layout="quadtree", quadtree=QuadtreeConfig())
    local = build_local_plan(tiling, geometry(128, 128), image=torch.full((1, 3, 1024, 1024), 0.5))
    assert len(local.leaves) == 16
    assert max(max(leaf.rect.w, leaf.rect.h) for leaf in local.leaves) == 256
    for t in local.tiles:  # a 32 x 32 core grown by the 8-px overlap, clipped at the latent border
        assert max(t.rect.h, t.rect.w) <= 32 + 2 * 8


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
