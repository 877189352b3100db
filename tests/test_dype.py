"""core/rope/dype.py: YaRN/NTK frequencies, DyPE v1/v2 modulation (arXiv 2510.20766) and the tables."""

import math

import pytest
import torch

from core.rope.dype import dype_axis, dype_tables, ntk_frequencies, yarn_frequencies
from core.rope.spec import RopeSpec
from core.rope.tables import base_frequencies, image_ids, rope_tables, text_ids

D, L0, THETA = 56, 64, 10000.0


def classify(freqs, dim, scale):
    """Label each pair k by which of f_base / f_lin (PI) / f_ntk it equals, or which two it lies between."""
    f_base = base_frequencies(dim)
    f_lin = f_base / scale
    f_ntk = base_frequencies(dim, THETA * scale ** (dim / (dim - 2)))
    labels = []
    for k in range(dim // 2):
        f, b, p, n = freqs[k].item(), f_base[k].item(), f_lin[k].item(), f_ntk[k].item()
        if math.isclose(f, b, rel_tol=1e-12):
            labels.append("base")  # k = 0: base == ntk == 1
        elif math.isclose(f, p, rel_tol=1e-12):
            labels.append("pi")  # k = d/2 - 1: ntk == pi exactly
        elif math.isclose(f, n, rel_tol=1e-12):
            labels.append("ntk")
        elif n < f < b:
            labels.append("base~ntk")
        elif p < f < n:
            labels.append("ntk~pi")
        else:
            labels.append("?")
    return labels


def spans(*parts):
    out = []
    for label, count in parts:
        out += [label] * count
    return out


@pytest.mark.parametrize("extent", [256, 160])  # s = 4 and 2.5: the ramps depend on d, L0, theta only
def test_v2_worked_example_t1(extent):
    # §8.3 v2, d = 56, L0 = 64, t = 1: gamma ramp over k = 0..5, NTK for k < 6, PI for k >= 8.
    freqs, _ = dype_axis(D, extent, 1.0, version="v2", base_patches=L0)
    expected = spans(("base", 1), ("base~ntk", 4), ("ntk", 2), ("ntk~pi", 1), ("pi", 20))
    assert classify(freqs, D, extent / L0) == expected


def test_v2_worked_example_t01():
    # §8.3 v2, t = 0.1: base for k <= 12, base<->NTK for 13..19 (19 sits at the NTK end),
    # NTK->PI for 20..21 (20 at the NTK end), PI for k >= 22 (6 pairs).
    freqs, _ = dype_axis(D, 256, 0.1, version="v2", base_patches=L0)
    expected = spans(("base", 13), ("base~ntk", 6), ("ntk", 2), ("ntk~pi", 1), ("pi", 6))
    assert classify(freqs, D, 4.0) == expected


def test_v1_classes_at_both_ends():
    # v1 at t = 1 (kappa = 2): gamma = (256, 4) -> ramp over r = [0, 3]; beta = (1.5625, 0.5625)
    # -> ramp over [5, 9] (r(n) = 56 ln(64 / (2 pi n)) / (2 ln 1e4), hand-evaluated). Only k = 0 is base.
    freqs, _ = dype_axis(D, 256, 1.0, version="v1", base_patches=L0)
    assert classify(freqs, D, 4.0) == spans(
        ("base", 1), ("base~ntk", 2), ("ntk", 3), ("ntk~pi", 3), ("pi", 19)
    )
    # As t -> 0 every threshold -> 1 and both ramps sit at r(1) = 7.06: base k <= 7, PI k >= 8.
    freqs, _ = dype_axis(D, 256, 0.0, version="v1", base_patches=L0)
    assert classify(freqs, D, 4.0) == spans(("base", 8), ("pi", 20))


def test_v2_at_t1_is_static_yarn():
    dyn, m_dyn = dype_axis(D, 200, 1.0, dynamic=True, version="v2")
    static, m_static = dype_axis(D, 200, None, dynamic=False)
    assert torch.equal(dyn, static) and m_dyn == m_static
    assert torch.equal(static, yarn_frequencies(D, 200 / 64))


def test_hand_derived_gamma_ramp_pair():
    # v2, t = 1, s = 4, k = 3: beta mask 1 (k < 6) -> f1 = f_ntk; gamma ramp (low 0, high 5) = 3/5,
    # so f = 0.6 f_ntk + 0.4 f_base with f_base = 1e4^(-6/56), f_ntk = f_base * 4^(-(56/54)(6/56)).
    f_base = 10000 ** (-6 / 56)
    f_ntk = f_base * 4 ** (-(56 / 54) * (6 / 56))
    freqs, _ = dype_axis(D, 256, 1.0)
    assert freqs[3].item() == pytest.approx(0.6 * f_ntk + 0.4 * f_base, rel=1e-14)


# Frozen once from core.rope.dype after an independent check: a scratch transcription of the official
# DyPE v2 yarn path (guyyariv/DyPE flux/transformer_flux.py) agreed to 4e-9 relative (its ramps are
# float32) for d in {56, 24}, extents 96..512, t in {1, .7, .5, .25, .1, .03}, static and dynamic.
GOLDEN = {
    ("v2", 256, 1.0): (0.3408311860482506, 0.04740441607308507, 0.003473738735932844, 0.00025),
    ("v2", 256, 0.1): (0.37275937203149406, 0.1, 0.012928267529417654, 0.0002950987500217971),
    ("v2", 128, 0.5): (0.36930551006906365, 0.08971979993938863, 0.006947477471865688, 0.0005),
    ("v1", 256, 1.0): (0.3195457287260883, 0.04740441607308507, 0.003473738735932844, 0.00025),
    ("v1", 128, 0.5): (0.3672331928916054, 0.0667758399515109, 0.006947477471865688, 0.0005),
}


@pytest.mark.parametrize("key", list(GOLDEN))
def test_golden_frequencies(key):
    version, extent, t = key
    freqs, _ = dype_axis(D, extent, t, version=version)
    got = [freqs[k].item() for k in (3, 7, 13, 21)]
    assert got == pytest.approx(GOLDEN[key], rel=1e-12)


def test_static_yarn_golden_and_ntk():
    static, m = dype_axis(D, 192, None, dynamic=False)  # s = 3
    assert [static[k].item() for k in (3, 7, 13)] == pytest.approx(
        (0.34705869106780146, 0.05427394473286892, 0.0046316516479104584), rel=1e-12
    )
    assert m == pytest.approx(0.1 * math.log(3) + 1)
    # NTK: theta' = theta * (s^(d/(d-2)))^(2 t^2); t = 0.5, s = 4 -> factor 4^(56/54 / 2).
    ntk, m_ntk = dype_axis(D, 256, 0.5, method="ntk")
    factor = 4 ** ((56 / 54) * 0.5)
    assert ntk[7].item() == pytest.approx((THETA * factor) ** -0.25, rel=1e-14)
    assert m_ntk == 1.0
    assert torch.allclose(ntk_frequencies(D, 4.0, t=0.0, dynamic=True), base_frequencies(D), rtol=0, atol=0)
    static_ntk = ntk_frequencies(D, 4.0)
    assert static_ntk[7].item() == pytest.approx((THETA * 4 ** (56 / 54)) ** -0.25, rel=1e-14)


def test_mscale_values():
    assert dype_axis(D, 256, 0.3)[1] == pytest.approx(1.1386294361119891, rel=1e-15)  # 0.1 ln 4 + 1
    assert dype_axis(D, 128, 0.3)[1] == pytest.approx(1.0693147180559945, rel=1e-15)  # 0.1 ln 2 + 1
    assert dype_axis(D, 64, 0.3)[1] == 1.0


@pytest.mark.parametrize("method", ["yarn", "ntk"])
@pytest.mark.parametrize("extent", [64, 40])
def test_native_extent_is_a_noop(method, extent):
    freqs, m = dype_axis(D, extent, 0.7, method=method)
    assert torch.equal(freqs, base_frequencies(D)) and m == 1.0


@pytest.mark.parametrize("dim", [56, 24])
@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("method", ["yarn", "ntk"])
@pytest.mark.parametrize("t", [0.0, 1e-6, 1.0])
def test_no_nan_at_time_edges(dim, version, method, t):
    freqs, m = dype_axis(dim, 512, t, method=method, version=version)
    assert torch.isfinite(freqs).all() and (freqs > 0).all() and math.isfinite(m)


def test_v2_t0_is_pi_everywhere():
    # §8.3: at t -> 0 exactly, low > high after the clamp and every pair is position-interpolated.
    for t in (0.0, 1e-6):
        freqs, _ = dype_axis(D, 256, t, version="v2")
        assert torch.allclose(freqs, base_frequencies(D) / 4.0, rtol=1e-14, atol=0)


def test_dype_tables_per_axis_and_text_rows():
    spec = RopeSpec(method="yarn", dynamic=True, exponent=2.0, version="v2")
    axes = (16, 24, 24)
    cos, sin = dype_tables(128, 48, axes_dims=axes, sigma=0.4, spec=spec, text_tokens=3)
    rows_f, rows_m = dype_axis(24, 128, 0.4)
    ids = torch.cat([text_ids(3), image_ids(128, 48)])
    ref = rope_tables(ids, [base_frequencies(16), rows_f, base_frequencies(24)], [1.0, rows_m, 1.0])
    assert torch.equal(cos, ref[0]) and torch.equal(sin, ref[1])
    # Text tokens sit at the origin: cos = mscale on the extended axis, 1 elsewhere.
    assert torch.allclose(cos[:3, 16:40], torch.full((3, 24), rows_m))
    assert torch.equal(cos[:3, 40:], torch.ones(3, 24))


def test_dype_tables_plain_cases():
    axes = (16, 56, 56)
    plain = rope_tables(image_ids(32, 64), [base_frequencies(d) for d in axes])
    yarn = RopeSpec(method="yarn")
    for spec in (None, RopeSpec(method="none"), yarn):  # yarn within the native grid: untouched
        got = dype_tables(32, 64, axes_dims=axes, sigma=0.5, spec=spec)
        assert torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1])
    extended = dype_tables(96, 64, axes_dims=axes, sigma=0.5, spec=yarn)
    assert not torch.equal(extended[0][: 32 * 64], plain[0])
    with pytest.raises(ValueError, match="sigma"):
        dype_tables(96, 64, axes_dims=axes, sigma=None, spec=yarn)
    static = dype_tables(96, 64, axes_dims=axes, sigma=None, spec=RopeSpec(method="yarn", dynamic=False))
    assert torch.isfinite(static[0]).all()


def test_validation_messages():
    with pytest.raises(ValueError, match="method"):
        dype_axis(D, 128, 0.5, method="pi")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[0, 1\], got 1.5"):
        dype_axis(D, 128, 1.5)
    with pytest.raises(ValueError, match="scale must be >= 1"):
        yarn_frequencies(D, 0.5)
    with pytest.raises(ValueError, match="beta0 >= beta1"):
        yarn_frequencies(D, 2.0, beta0=0.5, beta1=0.75)
