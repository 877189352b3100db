"""Phase plans and per-phase seeds (docs/upscale.md, "Phases")."""

import math

import pytest

from core.upscale.phases import (
    PhaseSize,
    cleanup_seed,
    needs_final_resize,
    next_seed,
    phase_count,
    phase_seeds,
    plan_phase_sizes,
)

pytestmark = pytest.mark.cpu
G = 0x9E3779B97F4A7C15


def test_square_doubling():
    assert plan_phase_sizes((1024, 1024), (4096, 4096)) == [PhaseSize(2048, 2048), PhaseSize(4096, 4096)]
    # An exact power of max_scale must not round up to an extra phase.
    assert phase_count((1000, 1000), (8000, 8000), 2.0) == 3
    assert plan_phase_sizes((1000, 1000), (8000, 8000))[:2] == [(2000, 2000), (4000, 4000)]


def test_finer_max_scale_hand_derived():
    # ratio 4, max 1.5: log 4 / log 1.5 = 3.42 -> S = 4, f = sqrt 2 per phase.
    # 1024 sqrt2 = 1448.15 = 90.51 x 16 -> 91 x 16 = 1456; 2048; 1024 2^1.5 = 2896.3 = 181.02 x 16 -> 2896.
    sizes = plan_phase_sizes((1024, 1024), (4096, 4096), max_scale=1.5)
    assert sizes == [(1456, 1456), (2048, 2048), (2896, 2896), (4096, 4096)]


def test_aspect_ratio_change_scales_each_axis_geometrically():
    # 768x1024 -> 2160x3840: ratios 2.8125 and 3.75 -> S = ceil(log2 3.75 = 1.91) = 2.
    # Phase 1: 768 sqrt(2.8125) = 1287.98 = 80.498 x 16 -> 80 x 16 = 1280;
    #          1024 sqrt(3.75) = 1982.97 = 123.94 x 16 -> 124 x 16 = 1984.
    sizes = plan_phase_sizes((768, 1024), (2160, 3840))
    assert sizes == [(1280, 1984), (2160, 3840)]
    assert not needs_final_resize((2160, 3840), sizes[-1])


def test_unaligned_target_rounds_up_and_needs_final_resize():
    sizes = plan_phase_sizes((500, 750), (1000, 1500))
    assert sizes == [(1008, 1504)]  # ceil(1000 / 16) = 63 -> 1008; ceil(1500 / 16) = 94 -> 1504
    assert needs_final_resize((1000, 1500), sizes[-1])
    assert plan_phase_sizes((500, 750), (1000, 1500), align=8) == [(1000, 1504)]


def test_equal_target_is_one_phase_and_smaller_is_an_error():
    assert plan_phase_sizes((1024, 1024), (1024, 1024)) == [(1024, 1024)]
    with pytest.raises(ValueError, match=r"\(1000, 2048\).*\(1024, 1024\)"):
        plan_phase_sizes((1024, 1024), (1000, 2048))
    with pytest.raises(ValueError, match="max_scale"):
        plan_phase_sizes((64, 64), (256, 256), max_scale=1.0)
    with pytest.raises(ValueError, match="phases"):
        plan_phase_sizes((64, 64), (256, 256), phases=0)


def test_explicit_phase_count_overrides_max_scale():
    sizes = plan_phase_sizes((1024, 1024), (2048, 2048), phases=2)
    # 1024 sqrt2 = 1448.15 -> 1456 (as above)
    assert sizes == [(1456, 1456), (2048, 2048)]


@pytest.mark.parametrize(
    "src, target, max_scale",
    [((512, 768), (3000, 2000), 2.0), ((333, 517), (4321, 1234), 1.7), ((1024, 576), (7680, 4320), 2.5)],
)
def test_phase_count_is_the_fewest_within_max_scale(src, target, max_scale):
    s = phase_count(src, target, max_scale)
    ratio = max(target[0] / src[0], target[1] / src[1])
    assert ratio ** (1 / s) <= max_scale + 1e-12
    assert s == 1 or ratio ** (1 / (s - 1)) > max_scale
    sizes = plan_phase_sizes(src, target, max_scale=max_scale)
    assert len(sizes) == s
    assert all(h % 16 == 0 and w % 16 == 0 for h, w in sizes)
    assert sizes[-1] == (math.ceil(target[0] / 16) * 16, math.ceil(target[1] / 16) * 16)


def test_seeds_follow_the_golden_stride():
    assert phase_seeds(0, 3) == [0, G, 0x3C6EF372FE94F82A]  # 2G mod 2^64
    assert cleanup_seed(0, 2) == 0x3C6EF372FE94F82A
    assert next_seed(0, 2, cleanup=False) == 0x3C6EF372FE94F82A
    assert next_seed(0, 2, cleanup=True) == 0xDAA66D2C7DDF743F  # 3G, no wrap
    assert phase_seeds(2**64 - 1, 2) == [2**64 - 1, G - 1]  # wraps mod 2^64
