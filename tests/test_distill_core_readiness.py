"""Readiness: the EMA and its hysteresis on a golden sequence, the minimum updates, fail closed on
non-finite values and above the loss ceiling, and a state round trip mid-run."""

from __future__ import annotations

import json
import math

import pytest

from core.distill.readiness import LayerReadiness, ReadinessConfig

pytestmark = pytest.mark.cpu

# Binary fractions so that every EMA below is exact: tau 1/4, exit at 1.5 tau = 3/8, decay 1/2.
CFG = ReadinessConfig(tau=0.25, exit_factor=1.5, ema_decay=0.5, min_updates=10)

# (distances observed in the run, updates at its flush, EMA after, ready after), derived by hand.
GOLDEN = [
    ([0.5, 0.25], 4, 0.375, False),  # first flush: EMA = mean; too few updates anyway
    ([0.125], 8, 0.25, False),  # EMA <= tau but 8 < min_updates
    ([0.25], 12, 0.25, True),  # becomes ready at EMA = tau
    ([0.5], 14, 0.375, True),  # above tau but <= 1.5 tau: stays ready
    ([0.5], 16, 0.4375, False),  # above 1.5 tau: not ready
    ([0.25], 18, 0.34375, False),  # back inside the band: stays not ready
    ([0.125], 20, 0.234375, True),  # <= tau: ready again
    ([], 22, 0.234375, True),  # a run without validation captures changes nothing
    ([math.nan], 24, 0.234375, False),  # non-finite: fail closed, the EMA keeps its finite value
    ([0.25], 26, 0.2421875, True),
]


def test_hysteresis_golden_sequence():
    r = LayerReadiness(CFG)
    for i, (distances, updates, ema, ready) in enumerate(GOLDEN):
        for d in distances:
            r.observe(d)
        assert r.flush(updates, last_loss=0.1) is ready, f"run {i}"
        assert (r.ema, r.ready) == (ema, ready), f"run {i}"
    assert (r.flushes, r.failed_runs) == (len(GOLDEN), 1)


def test_default_ema_decay_is_nine_tenths():
    r = LayerReadiness(ReadinessConfig(tau=0.01, min_updates=0))
    r.observe(0.02)
    r.flush(1, 0.1)
    r.observe(0.0)
    assert not r.flush(2, 0.1) and r.ema == pytest.approx(0.018)  # 0.9 x 0.02 + 0.1 x 0


def test_a_non_finite_loss_makes_the_layer_not_ready():
    r = LayerReadiness(ReadinessConfig(tau=0.1, min_updates=0))
    r.observe(0.01)
    assert r.flush(5, 0.1)
    r.observe(0.01)
    assert not r.flush(6, math.inf)


def test_may_serve_fails_closed():
    r = LayerReadiness(ReadinessConfig(tau=0.1, min_updates=0, loss_ceiling=0.5))
    assert not r.may_serve(0.1, True)  # not ready
    r.observe(0.05)
    r.flush(1, 0.1)
    assert r.may_serve(0.1, True) and r.may_serve(0.5, True)
    assert not r.may_serve(0.51, True)  # above the ceiling
    assert not r.may_serve(math.nan, True) and not r.may_serve(None, True)
    assert not r.may_serve(0.1, False)  # a non-finite output


def test_state_round_trip_mid_run_continues_identically():
    a = LayerReadiness(CFG)
    for distances, updates, _, _ in GOLDEN[:4]:
        for d in distances:
            a.observe(d)
        a.flush(updates, 0.1)
    a.observe(0.5)  # pending when the checkpoint is taken
    b = LayerReadiness(CFG)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # the manifest is JSON
    for r in (a, b):
        r.flush(16, 0.1)
    assert a.state_dict() == b.state_dict() and (b.ema, b.ready) == (0.4375, False)
    with pytest.raises(ValueError, match="readiness state is for"):
        LayerReadiness(ReadinessConfig(tau=0.2)).load_state_dict(a.state_dict())


@pytest.mark.parametrize(
    ("field", "value"), [("tau", 0.0), ("exit_factor", 0.9), ("ema_decay", 1.0), ("min_updates", -1)]
)
def test_readiness_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"readiness.{field}"):
        ReadinessConfig(**{field: value})
