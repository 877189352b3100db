"""The distillation job's state: cross-layer quantiles and the Pareto score, a checkpoint round trip,
and a checkpoint of another config refused naming the field."""

from __future__ import annotations

import dataclasses

import pytest

from tasks.distill import fingerprint
from tasks.distill_config import DistillConfig, TeacherConfig, TrainingConfig
from tasks.distill_records import LayerReport, RunReport
from tasks.distill_state import DistillState, quantile

pytestmark = pytest.mark.cpu


def layer(key: str, *, loss: float, ema: float | None, ready: bool) -> LayerReport:
    return LayerReport(
        key=key, group=0, updates=10, new_updates=4, train_captures=2, val_captures=1, loss=loss,
        smooth_l1=loss / 2, cosine_distance=0.02, nmse=0.1, gate=0.1, mean_loss=loss,
        val_cosine_distance=ema, val_nmse=0.2, ema_cosine_distance=ema, ready=ready, may_serve=ready,
        skipped=0,
        ladder=[], train_s=0.1,
    )  # fmt: skip


def report(run: int, layers: list[LayerReport]) -> RunReport:
    return RunReport(
        run, 0, 0, {r.key: r for r in layers}, {r.key: {"x": run} for r in layers}, 3, 300, 1.0, 1.0
    )


def test_quantiles_ready_count_and_pareto_score():
    assert quantile([4.0, 1.0, 3.0, 2.0], 0.25) == 1.75  # numpy's linear rule: 1 + 0.75 * (2 - 1)
    state = DistillState()
    row = state.finish(
        report(0, [layer("a", loss=1.0, ema=0.01, ready=True), layer("b", loss=3.0, ema=0.004, ready=True)])
    )
    state.finish(report(1, [layer("c", loss=2.0, ema=0.5, ready=False)]))
    summary = state.summary()
    assert summary["loss/min"] == 1.0 and summary["loss/p50"] == 2.0 and summary["loss/max"] == 3.0
    assert summary["ready_layers"] == 2.0
    assert summary["pareto"] == pytest.approx(2 * (1 - 0.01))  # the worst READY layer's EMA
    assert row["a/loss"] == 1.0 and row["b/ready"] == 1.0 and state.updates == 12


def test_checkpoint_round_trip_and_another_config_is_refused():
    cfg = DistillConfig(teacher=TeacherConfig(runs=4))
    state = DistillState(fingerprint=fingerprint(cfg))
    state.finish(report(0, [layer("a", loss=1.0, ema=0.01, ready=True)]))
    saved = state.state_dict()
    again = DistillState(fingerprint=fingerprint(dataclasses.replace(cfg, teacher=TeacherConfig(runs=9))))
    again.load_state_dict(saved)  # more runs: the same job, continued
    assert again.state_dict() == saved | {"fingerprint": again.fingerprint}
    other = dataclasses.replace(cfg, training=TrainingConfig(updates=7))
    with pytest.raises(ValueError, match=r"training\.updates=7 \(checkpoint: 200\)"):
        DistillState(fingerprint=fingerprint(other)).load_state_dict(saved)
