"""Tests for core.eval.pictures: chart geometry, exact recovery of a linear latent preview, panel shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.eval.pictures import (
    AXIS_RGB,
    BACKGROUND,
    BAR_RGB,
    WHISKER_RGB,
    LatentPreview,
    bar_chart,
    fit_latent_preview,
    grid,
    preview_rgb,
)
from core.flow.seeds import cpu_generator

pytestmark = pytest.mark.cpu


def _is(img: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    return (img == np.array(rgb, dtype=np.uint8)).all(axis=-1)


def _zero_row(img: np.ndarray) -> int:
    """The zero line: the row with the most axis-coloured pixels."""
    return int(_is(img, AXIS_RGB).sum(axis=1).argmax())


# ------------------------------------------------------------------------------------------- bar chart


def test_bar_chart_shape_and_sign():
    img = bar_chart([1.0, -0.5], title="latent mean", labels=["c0", "c1"], size=(200, 300))
    assert img.shape == (200, 300, 3) and img.dtype == np.uint8
    zero = _zero_row(img)
    bar = _is(img, BAR_RGB)
    left, right = bar[:, :150], bar[:, 150:]
    rows_left, rows_right = np.nonzero(left.any(axis=1))[0], np.nonzero(right.any(axis=1))[0]
    # Positive bar strictly above the zero line (up to the line itself), negative bar below it.
    assert rows_left.max() <= zero and rows_left.min() < zero - 50
    assert rows_right.min() >= zero and rows_right.max() > zero + 20
    # The positive bar is twice as tall as the negative one (to rounding).
    assert abs((zero - rows_left.min()) - 2 * (rows_right.max() - zero)) <= 2


def test_bar_chart_all_negative_puts_zero_near_top():
    img = bar_chart([-1.0, -2.0, -3.0], size=(160, 240))
    zero = _zero_row(img)
    rows = np.nonzero(_is(img, BAR_RGB).any(axis=1))[0]
    assert zero < 30 and rows.min() >= zero and rows.max() > 120


def test_bar_chart_error_whiskers_extend_past_bar():
    img = bar_chart([1.0], errors=[0.5], size=(200, 200))
    bar_top = np.nonzero(_is(img, BAR_RGB).any(axis=1))[0].min()
    whisker = np.nonzero(_is(img, WHISKER_RGB).any(axis=1))[0]
    assert whisker.min() < bar_top - 20  # value + error above the bar end
    assert whisker.max() > bar_top + 20  # value - error inside the bar
    plain = bar_chart([1.0], size=(200, 200))
    assert not _is(plain, WHISKER_RGB).any()


def test_bar_chart_text_bands():
    values = list(np.linspace(-1, 1, 32))
    bare = bar_chart(values)
    titled = bar_chart(values, title="per-channel mean")
    labelled = bar_chart(values, labels=[str(i) for i in range(32)])
    ink = lambda im: _is(im, (0, 0, 0))  # noqa: E731
    assert ink(titled)[:12].sum() > ink(bare)[:12].sum()
    assert ink(labelled)[-14:].sum() > ink(bare)[-14:].sum()


def test_bar_chart_validation():
    with pytest.raises(ValueError, match="empty"):
        bar_chart([])
    with pytest.raises(ValueError, match="errors and labels"):
        bar_chart([1.0, 2.0], errors=[0.1])
    with pytest.raises(ValueError, match="finite"):
        bar_chart([float("nan")])
    with pytest.raises(ValueError, match="too small"):
        bar_chart([1.0], size=(20, 20))


# -------------------------------------------------------------------------------------- latent preview


def _blocky(rgb_small: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest upscale, so area downsampling by `factor` gives rgb_small back exactly."""
    return F.interpolate(rgb_small, scale_factor=factor, mode="nearest")


def test_fit_latent_preview_recovers_known_map():
    c, h, w = 16, 12, 10
    g = cpu_generator(11)
    latent = torch.randn(1, c, h, w, generator=g)
    weight = 0.05 * torch.randn(3, c, generator=g)
    bias = torch.tensor([0.5, 0.4, 0.6])
    rgb = torch.einsum("kc,bchw->bkhw", weight, latent) + bias.view(1, 3, 1, 1)
    preview = fit_latent_preview(latent, _blocky(rgb, 8))
    assert torch.allclose(preview.weight, weight, atol=1e-5)
    assert torch.allclose(preview.bias, bias, atol=1e-5)
    assert preview.weight.dtype == torch.float32
    expected = (rgb[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    got = preview_rgb(latent, preview)
    assert got.shape == (h, w, 3) and got.dtype == np.uint8
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


def test_fit_latent_preview_inverts_a_latent_that_is_linear_in_the_image():
    # Synthetic "VAE": latent = A image + b with 16 channels of rank 3; the fit must reproduce the image.
    c, h, w = 16, 8, 8
    g = cpu_generator(12)
    small = torch.rand(1, 3, h, w, generator=g)
    a, b = torch.randn(c, 3, generator=g), torch.randn(c, generator=g)
    latent = torch.einsum("ck,bkhw->bchw", a, small) + b.view(1, c, 1, 1)
    preview = fit_latent_preview(latent, _blocky(small, 8))
    predicted = torch.einsum("kc,chw->khw", preview.weight, latent[0]) + preview.bias.view(3, 1, 1)
    assert torch.allclose(predicted, small[0], atol=1e-4)


def test_preview_rgb_clamps_and_upscales():
    preview = LatentPreview(weight=torch.tensor([[1.0], [-1.0], [0.0]]), bias=torch.tensor([0.0, 0.0, 0.5]))
    latent = torch.tensor([[[[2.0, 0.25]]]])  # [1, 1, 1, 2]
    out = preview_rgb(latent, preview, upscale=3)
    assert out.shape == (3, 6, 3)
    assert out[0, 0].tolist() == [255, 0, 128] and out[2, 5].tolist() == [64, 0, 128]
    with pytest.raises(ValueError, match="C = 1"):
        preview_rgb(torch.zeros(1, 2, 1, 1), preview)


def test_latent_preview_validates_shapes():
    with pytest.raises(ValueError, match="weight must be"):
        LatentPreview(weight=torch.zeros(4, 2), bias=torch.zeros(3))
    with pytest.raises(ValueError, match="bias must be"):
        LatentPreview(weight=torch.zeros(3, 2), bias=torch.zeros(2))


# ------------------------------------------------------------------------------------------- panels


def test_one_row_resizes_to_tallest_and_labels():
    a = np.full((40, 30, 3), 10, dtype=np.uint8)
    b = np.full((20, 20, 3), 200, dtype=np.uint8)
    out = grid([a, b], pad=4)
    assert out.shape == (40 + 2 * 4, 4 + 30 + 4 + 40 + 4, 3) and out.dtype == np.uint8
    assert (out[4:44, 4:34] == 10).all() and (out[4:44, 38:78] == 200).all()
    labelled = grid([a, b], labels=["result", "bicubic"], pad=4)
    band = labelled.shape[0] - out.shape[0]
    assert band > 0 and labelled.shape[1] == out.shape[1]
    assert _is(labelled[: band + 4], (0, 0, 0)).any()  # label text above the panels
    assert (labelled[4 + band : 44 + band, 4:34] == 10).all()


def test_grid_layout():
    ims = [np.full((5, 7, 3), i * 40, dtype=np.uint8) for i in range(5)]
    out = grid(ims, cols=3, pad=2)
    assert out.shape == (2 * 5 + 3 * 2, 3 * 7 + 4 * 2, 3)
    assert (out[2:7, 2:9] == 0).all() and (out[9:14, 11:18] == 160).all()
    assert (out[9:14, 20:27] == np.array(BACKGROUND)).all()  # empty last cell
    # Mixed sizes: brought to the tallest height (10), columns as wide as their widest panel.
    mixed = grid([ims[0], np.full((10, 4, 3), 7, dtype=np.uint8), ims[1]], cols=2, pad=1)
    assert mixed.shape == (2 * 10 + 3, 14 + 4 + 3, 3) and (mixed[1:11, 16:20] == 7).all()
    with pytest.raises(ValueError, match="uint8"):
        grid([np.zeros((4, 4), dtype=np.uint8)])


# ------------------------------------------------------------------ latent statistics, comparison


def test_reference_lines_are_drawn_at_their_values_and_widen_the_axis():
    from core.eval.pictures import REFERENCE_RGB, latent_stats_chart

    plain = bar_chart([0.2, -0.1], size=(200, 300))
    assert not _is(plain, REFERENCE_RGB).any()
    chart = bar_chart([0.2, -0.1], size=(200, 300), reference=[(1.0, "+1"), (-1.0, "-1")])
    rows = np.nonzero(_is(chart, REFERENCE_RGB)[:, 60:250].sum(axis=1) > 60)[0]  # the dashed lines
    zero = _zero_row(chart)
    assert len(rows) == 2 and abs((zero - rows[0]) - (rows[1] - zero)) <= 1  # +1 and -1, symmetric
    bars = np.nonzero(_is(chart, BAR_RGB).any(axis=1))[0]
    assert rows[0] < bars.min() and bars.max() < rows[1]  # both bars inside [-1, 1]
    stats = latent_stats_chart([0.1] * 32, [1.0] * 32, title="phase1")
    assert stats.shape == (360, 720, 3) and max(stats.shape[:2]) >= 512
    assert _is(stats, REFERENCE_RGB).any() and _is(stats, WHISKER_RGB).any()


def test_detail_window_finds_the_textured_patch():
    from core.eval.pictures import detail_window

    img = np.full((96, 128, 3), 128, dtype=np.uint8)
    g = np.random.default_rng(0)
    img[40:72, 64:96] = g.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)  # the only detail
    # windows of 32 on a stride of 8: the one exactly over the patch has every gradient
    assert detail_window(img, 32) == (40, 64)
    with pytest.raises(ValueError, match="window side"):
        detail_window(img, 97)


def test_comparison_shows_overviews_and_one_to_one_crops():
    from core.eval.pictures import OUTLINE_RGB, comparison, preview_scale

    g = np.random.default_rng(1)
    a = g.integers(0, 256, size=(128, 160, 3), dtype=np.uint8)
    b = np.full_like(a, 40)
    out = comparison([b, a], ["bicubic", "Tessera: PSNR 30.00 dB"], crop=64, pad=8)
    k = preview_scale(128, 160)  # 4: the overviews reach 512 px on their long side
    assert k == 4 and out.shape[1] == 8 + 160 * k + 8 + 160 * k + 8
    assert _is(out, OUTLINE_RGB).any()  # the crop window outlined on the overviews
    # a 1:1 crop of `a` (64 x 64 pixels, unscaled) appears in the bottom row, right of b's crop
    bottom = out[-(64 + 8) : -8]
    x = 8 + 64 + 8
    crops = [bottom[:, x : x + 64]]
    top, left = next(
        (t, l)
        for t in range(0, 128 - 63)
        for l in range(0, 160 - 63)
        if np.array_equal(a[t : t + 64, l : l + 64], crops[0])
    )
    assert (top, left) == (top // 16 * 16, left // 16 * 16)  # on the window grid (stride 64 // 4)
    large = np.zeros((1500, 3000, 3), dtype=np.uint8)
    assert comparison([large], ["x"], pad=0).shape[1] == 1024  # area-downscaled to 1024 px
    with pytest.raises(ValueError, match="one size"):
        comparison([a, a[:64]], ["a", "b"])


def test_upscale_comparison_measures_against_a_reference_and_previews_are_large(tmp_path, assets):
    from PIL import Image

    from core.models.loading import ModelSpec
    from core.upscale.resize import resize_image
    from runner.artifacts import read_image, write_png
    from runner.context import JobArtifacts, JobContext, LocalModelPool
    from runner.models import load_model
    from tasks.upscale import run
    from tasks.upscale_config import CoherenceConfig, OutputsConfig, UpscaleConfig

    photo = tmp_path / "crop.png"
    Image.open(assets / "images/eval/set5/bird.png").convert("RGB").crop((100, 100, 180, 164)).save(photo)
    # the reference is the bicubic upscale itself, rounded to 8 bits: against it bicubic scores the
    # PSNR of that rounding alone (uniform error of one level: 10 log10(12 * 255^2) = 58.9 dB)
    reference = tmp_path / "reference.png"
    write_png(reference, resize_image(read_image(photo), (128, 160), "bicubic"))
    cfg = UpscaleConfig(
        model=ModelSpec(kind="random", shape="tiny"),
        image=str(photo),
        scale=2.0,
        phases=1,
        steps=4,
        denoise=(0.5,),
        skip_residual=None,
        coherence=CoherenceConfig(dilated=0),
        outputs=OutputsConfig(previews=True, checkpoints=False, reference=str(reference)),
    )
    arts = JobArtifacts(tmp_path / "out")
    run(cfg, JobContext(arts, LocalModelPool(load_model(cfg.model, "cpu"))))
    scores = arts.records["comparison"]
    assert 58 < scores["bicubic"]["psnr_db"] < 62 and scores["bicubic"]["ssim"] > 0.999
    assert 5 < scores["Tessera"]["psnr_db"] < 45 and scores["Tessera"]["ssim"] < 0.99
    picture = np.asarray(Image.open(tmp_path / "out/comparison.png"))
    assert picture.shape[1] > 3 * 512  # bicubic, Tessera and the reference, each >= 512 px wide
    previews = sorted((tmp_path / "out/phase1/previews").glob("*.png"))
    assert previews and all(max(Image.open(p).size) >= 512 for p in previews)
    assert max(Image.open(tmp_path / "out/phase1/latent_stats.png").size) >= 512
