"""core/rope/tables.py: Flux RoPE tables against diffusers' FluxPosEmbed, ids, mscale."""

import math
import os

import pytest
import torch

from core.rope.tables import base_frequencies, image_ids, rope_tables, text_ids

FLUX_AXES = (16, 56, 56)
REFERENCE_AXES = (16, 24, 24)


def _flux_pos_embed(axes_dims):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    return FluxPosEmbed(theta=10000, axes_dim=list(axes_dims))


@pytest.mark.parametrize("axes_dims", [FLUX_AXES, REFERENCE_AXES])
def test_tables_equal_diffusers_bitwise(axes_dims):
    ids = torch.cat([text_ids(7), image_ids(9, 13)])
    ours = rope_tables(ids, [base_frequencies(d) for d in axes_dims])
    ref = _flux_pos_embed(axes_dims)(ids)
    for a, b in zip(ours, ref, strict=True):
        assert a.dtype == torch.float32 and a.shape == (7 + 9 * 13, sum(axes_dims))
        assert torch.equal(a, b)


def test_base_frequencies_golden():
    # Hand-derived: f_k = 10000^(-2k/d); d = 56, k = 7 -> 10000^-0.25 = 0.1; k = 14 -> 0.01.
    f = base_frequencies(56)
    assert f.dtype == torch.float64 and f.shape == (28,)
    assert f[0].item() == 1.0
    assert f[7].item() == pytest.approx(0.1, rel=1e-15)
    assert f[14].item() == pytest.approx(0.01, rel=1e-15)
    assert f[3].item() == pytest.approx(10000 ** (-6 / 56), rel=1e-15)
    with pytest.raises(ValueError, match="even"):
        base_frequencies(15)


def test_image_and_text_ids():
    ids = image_ids(2, 3)
    expected = [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 1, 2]]
    assert ids.tolist() == expected
    assert text_ids(4).shape == (4, 3) and not text_ids(4).any()


def test_table_layout_pairs_and_angles():
    # Token (0, 2, 5): on the row axis the pair k has angle 2 f_k, repeated over its two channels.
    ids = torch.tensor([[0.0, 2.0, 5.0]])
    cos, sin = rope_tables(ids, [base_frequencies(d) for d in REFERENCE_AXES])
    row = slice(16, 40)
    f_row = base_frequencies(24)
    assert cos[0, row][2].item() == pytest.approx(math.cos(2 * f_row[1].item()), abs=1e-7)
    assert cos[0, row][2].item() == cos[0, row][3].item()
    col = slice(40, 64)
    assert sin[0, col][0].item() == pytest.approx(math.sin(5.0), abs=1e-7)
    assert torch.equal(cos[0, :16], torch.ones(16)) and not sin[0, :16].any()


def test_mscale_scales_each_axis():
    ids = image_ids(3, 4)
    freqs = [base_frequencies(d) for d in REFERENCE_AXES]
    cos, sin = rope_tables(ids, freqs)
    cos_m, sin_m = rope_tables(ids, freqs, [1.0, 1.5, 2.0])
    assert torch.equal(cos_m[:, :16], cos[:, :16])
    assert torch.allclose(cos_m[:, 16:40], 1.5 * cos[:, 16:40])
    assert torch.allclose(sin_m[:, 40:], 2.0 * sin[:, 40:])
    with pytest.raises(ValueError, match="one value per axis"):
        rope_tables(ids, freqs, [1.0, 2.0])
