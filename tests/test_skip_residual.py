"""Skip-residual schedules, strengths, blends and rewind (docs/upscale.md, "Skip residual and rewind")."""

import math

import pytest
import torch

from core.upscale.skip_residual import (
    SkipResidual,
    blend,
    linear_values,
    mix_with_reference,
    phase_strengths,
    reference_weights,
    rewind_ranges,
    stage_skip,
    step_schedule,
)

pytestmark = pytest.mark.cpu
R2 = math.sqrt(2.0)


def close(a, b, tol=1e-12):
    assert len(a) == len(b), (a, b)
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) <= tol, (a, b)


# --- step schedules ------------------------------------------------------------------------------


def test_cosine_schedule_hand_derived():
    # c1 = (0.5 (1 - cos(pi k / 4)))^alpha: 0, (2 - sqrt2)/4, 1/2, (2 + sqrt2)/4 before the power.
    base = [0.0, (2 - R2) / 4, 0.5, (2 + R2) / 4]
    close(step_schedule("cosine", 4, alpha1=1.0), base)
    close(step_schedule("cosine", 4), [b**2.4 for b in base])
    # Frozen once from the implementation, equal to the closed forms above.
    close(step_schedule("cosine", 4), [0.0, 0.00994558585546077, 0.18946457081379972, 0.6838386772375689])


def test_cosine_stop_saturates_and_ignores_start():
    # stop 0.5 of 8 steps -> S' = 4: k = 0..4 follow the curve over 4 steps, then 1.
    c1 = step_schedule("cosine", 8, alpha1=1.0, stop=0.5, start=0.25)
    close(c1, [0.0, (2 - R2) / 4, 0.5, (2 + R2) / 4, 1.0, 1.0, 1.0, 1.0])


def test_linear_schedule_with_start_and_stop():
    close(step_schedule("linear", 4), [0.0, 0.25, 0.5, 0.75])
    # start 0.3 -> step 3, stop 0.6 -> step 6: 0 before 3, k/6 up to 6, then 1.
    c1 = step_schedule("linear", 10, start=0.3, stop=0.6)
    close(c1, [0, 0, 0, 3 / 6, 4 / 6, 5 / 6, 1, 1, 1, 1])


def test_logistic_schedule_hand_derived():
    # 5 steps, alpha 1: k_max 4, mid = (5 / 2) / 4 = 0.625, steepness 5.
    expect = [1 / (1 + math.exp(-5 * (k / 4 - 0.625))) for k in range(5)]
    close(step_schedule("logistic", 5, alpha1=1.0), expect)
    assert step_schedule("logistic", 5, alpha1=1.0)[0] == pytest.approx(0.042087727915618836, abs=1e-15)
    # 4 steps, alpha 2.4: mid = 2 / 3 so k = 2 sits exactly on the midpoint.
    assert step_schedule("logistic", 4)[2] == pytest.approx(0.5, abs=1e-15)


def test_logistic_start_stop_gates():
    # start 0.2 -> 2, stop 0.7 -> 7, k_max 9, mid = 4.5 / 9 = 0.5, steepness 12.
    c1 = step_schedule("logistic", 10, start=0.2, stop=0.7)
    assert c1[:2] == [0.0, 0.0] and c1[8:] == [1.0, 1.0]
    close(c1[2:8], [1 / (1 + math.exp(-12 * (k / 9 - 0.5))) for k in range(2, 8)])
    assert c1[7] == pytest.approx(0.9655548043337889, abs=1e-15)


def test_clamp_then_rescale():
    c1 = step_schedule("cosine", 10, clamp=0.5, blend_min=0.2, blend_max=0.6)
    raw = [(0.5 * (1 - math.cos(math.pi * k / 10))) ** 2.4 for k in range(5)]
    close(c1, [0.2 + 0.4 * r for r in raw] + [0.6] * 5)


def test_schedules_are_finite_where_upstream_divides_by_zero():
    assert step_schedule("cosine", 4, stop=0.0) == [0.0, 1.0, 1.0, 1.0]
    assert step_schedule("linear", 1) == [0.0]
    assert step_schedule("logistic", 1) == pytest.approx([1 / (1 + math.exp(6.0))])


@pytest.mark.parametrize("kind", ["cosine", "linear", "logistic"])
def test_schedules_rise(kind):
    c1 = step_schedule(kind, 16)
    assert all(c1[k + 1] >= c1[k] for k in range(len(c1) - 1))
    assert all(0.0 <= c <= 1.0 for c in c1)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"kind": "sigmoid"}, "kind"),
        ({"steps": 0}, "steps"),
        ({"alpha1": 0.0}, "alpha1"),
        ({"start": 0.6, "stop": 0.5}, "start"),
        ({"clamp": 1.5}, "clamp"),
        ({"blend_max": -0.1}, "blend_max"),
    ],
)
def test_schedule_validation(kwargs, word):
    args = {"kind": "cosine", "steps": 4, **kwargs}
    with pytest.raises(ValueError, match=word):
        step_schedule(args.pop("kind"), args.pop("steps"), **args)


# --- per-phase values ----------------------------------------------------------------------------


def test_phase_strengths_geometric_with_exact_endpoints():
    assert phase_strengths(0.8, 0.05, 1) == [0.8]
    assert phase_strengths(0.8, 0.05, 2) == [0.8, 0.05]
    close(phase_strengths(0.8, 0.05, 3), [0.8, 0.2, 0.05], 1e-15)
    # r = (1/16)^(1/3): 0.8 * 16^(-1/3) = 0.31748..., 0.8 * 16^(-2/3) = 0.12599...
    close(phase_strengths(0.8, 0.05, 4), [0.8, 0.8 * 16 ** (-1 / 3), 0.8 * 16 ** (-2 / 3), 0.05], 1e-15)
    assert [round(v, 3) for v in phase_strengths(0.8, 0.05, 4)] == [0.8, 0.317, 0.126, 0.05]
    # A zero end computes r with 1e-6 and is then restored exactly.
    s = phase_strengths(0.8, 0.0, 3)
    assert s[-1] == 0.0 and s[1] == pytest.approx(0.8 * math.sqrt(1e-6 / 0.8))


def test_linear_values():
    close(linear_values(0.35, 0.15, 3), [0.35, 0.25, 0.15], 1e-15)
    assert linear_values(0.35, 0.15, 1) == [0.35]
    with pytest.raises(ValueError, match="n must be"):
        linear_values(0.1, 0.2, 0)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_addition():
    out = blend("addition", t([1.0, 0.0]), t([0.0, 1.0]), 0.25)
    torch.testing.assert_close(out, t([0.75, 0.25]))


def test_slerp_hand_derived():
    # Orthogonal: omega = pi/2, so weights are sin((1-c) pi/2) and sin(c pi/2).
    torch.testing.assert_close(blend("slerp", t([1.0, 0.0]), t([0.0, 1.0]), 0.5), t([1 / R2, 1 / R2]))
    torch.testing.assert_close(
        blend("slerp", t([1.0, 0.0]), t([0.0, 1.0]), 1 / 3), t([math.sqrt(3) / 2, 0.5])
    )
    torch.testing.assert_close(blend("slerp", t([2.0, 0.0]), t([0.0, 3.0]), 0.5), t([R2, 3 / R2]))


def test_slerp_never_nan():
    z = t([1.0, 2.0, 3.0])
    for x, expect in [
        (z.clone(), z),  # parallel: lerp of equal vectors
        (-z, (1 - 2 * 0.3) * z),  # antiparallel: lerp passes through zero
        (torch.zeros_like(z), 0.7 * z),  # zero trajectory
        (z + 1e-5, 0.7 * z + 0.3 * (z + 1e-5)),  # sin(omega) below the guard
    ]:
        out = blend("slerp", z, x, 0.3)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, expect)
    assert torch.isfinite(blend("slerp", torch.zeros(1, 3), torch.zeros(1, 3), 0.5)).all()


def test_slerp_is_per_batch_item():
    g = torch.Generator().manual_seed(0)
    z, x = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    x[1] = z[1]  # one parallel item must not change the others
    out = blend("slerp", z, x, 0.4)
    for i in range(3):
        torch.testing.assert_close(out[i : i + 1], blend("slerp", z[i : i + 1], x[i : i + 1], 0.4))
    torch.testing.assert_close(out[1], z[1])


def test_norm_only_keeps_the_reference_norm():
    z, x = t([3.0, 4.0]), t([0.0, 2.0])  # |z'| = 5
    torch.testing.assert_close(blend("norm_only", z, x, 1.0), t([0.0, 5.0]))
    torch.testing.assert_close(blend("norm_only", z, x, 0.5), t([1.5, 4.5]))  # chord, |.| < 5
    torch.testing.assert_close(blend("norm_only", z, x, 0.0), z)
    torch.testing.assert_close(blend("norm_only", z, torch.zeros_like(x), 0.4), 0.6 * z)


def test_blend_keeps_dtype_and_checks_inputs():
    z = torch.randn(1, 4, 3, 3).bfloat16()
    for kind in ("addition", "slerp", "norm_only"):
        assert blend(kind, z, z.clone(), 0.5).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="shapes"):
        blend("addition", z, z[..., :2], 0.5)
    with pytest.raises(ValueError, match="blend kind"):
        blend("screen", z, z, 0.5)


def test_mix_with_reference_weights_the_reference():
    g = torch.Generator().manual_seed(1)
    x, z = torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 4, 6, 6, generator=g)
    torch.testing.assert_close(mix_with_reference(x, z, 0.3, "addition"), 0.7 * x + 0.3 * z)
    torch.testing.assert_close(mix_with_reference(x, z, 0.3, "slerp"), blend("slerp", z, x, 0.7))


# --- config, composition, rewind, stage skip -------------------------------------------------------


def test_skip_residual_validation_names_the_field():
    SkipResidual()
    for kwargs, word in [
        ({"kind": "cos"}, "skip_residual.kind"),
        ({"blend": "mul"}, "skip_residual.blend"),
        ({"alpha1": -1.0}, "skip_residual.alpha1"),
        ({"phase_end": 1.2}, "skip_residual.phase_end"),
        ({"start": 0.9, "stop": 0.5}, "skip_residual.start"),
    ]:
        with pytest.raises(ValueError, match=word):
            SkipResidual(**kwargs)


def test_reference_weights_compose_phase_strength_and_schedule():
    cfg = SkipResidual()
    c1 = step_schedule("cosine", 4)
    close(reference_weights(cfg, 4, 0, 3), [0.8 * (1 - c) for c in c1], 1e-15)
    close(reference_weights(cfg, 4, 1, 3), [0.2 * (1 - c) for c in c1], 1e-15)
    assert reference_weights(cfg, 4, 2, 3)[0] == 0.05
    cfg = SkipResidual(kind="linear", phase_start=1.0, blend_min=0.5)
    close(reference_weights(cfg, 4, 0, 1), [0.5, 0.375, 0.25, 0.125])
    with pytest.raises(ValueError, match="phase"):
        reference_weights(cfg, 4, 3, 3)


def test_rewind_ranges():
    assert rewind_ranges(100, 0.5, 0.8) == [(0, 100), (50, 100), (75, 100)]
    assert rewind_ranges(10, 0.5, 1.0) == [(0, 10), (5, 10), (7, 10), (8, 10), (9, 10)]
    assert rewind_ranges(10, 0.0, 1.0) == [(0, 10)]  # no advance: no infinite loop
    assert rewind_ranges(10, 1.0, 1.0) == [(0, 10)]  # an empty (10, 10) range is not listed


def test_stage_skip_is_upstream_lerp():
    g = torch.Generator().manual_seed(2)
    y, u = torch.randn(1, 16, 4, 4, generator=g), torch.randn(1, 16, 4, 4, generator=g)
    torch.testing.assert_close(stage_skip(y, u, 0.8), torch.lerp(y, u, 0.8))
    torch.testing.assert_close(stage_skip(torch.zeros(1), torch.ones(1), 0.8), torch.tensor([0.8]))
