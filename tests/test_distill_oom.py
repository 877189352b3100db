"""The OOM ladder in a distillation worker (runner/distill/session.py) on the reference model's real
teacher runs and the node's real replay store: a trainer memory budget (core/distill/memory.py)
raises torch.OutOfMemoryError at the caps it does not fit; each rung's caps are what the layer's next
update runs at; each rung clears the layer's captures from the store; after the last rung the layer
stops training while its teacher runs go on; every rung reaches the job's record; a session resumed
from the states keeps the ladder.

Session A (256 px, 260 tokens) has a budget between the estimates of rung 1 and rung 2: its first two
runs step down, the third trains at rung 2, whose 256-key chunk splits the 260 keys in two (seen as
two calls of the key feature map per forward). Session B (128 px) has a budget below every rung: five
runs walk the ladder to its stop."""

from __future__ import annotations

import pytest
import torch
from test_replay_helpers import ram_tmpdir, remove

from core.distill.memory import StepShape, training_step_bytes
from core.distill.oom_ladder import OomLadder, TrainCaps
from core.distill.ratio_limiter import RatioLimiterConfig
from core.distill.replay_policy import ReplayPolicyConfig
from core.distill.trainer import TrainerConfig
from core.models.loading import ModelSpec
from runner.distill.session import DistillSession
from runner.replay import ReplayConfig, connect_store, shutdown_store
from tasks.distill_config import (
    CaptureConfig,
    DistillConfig,
    ReplayBudgets,
    StudentOptions,
    TeacherConfig,
    TrainingConfig,
)
from tasks.distill_state import DistillState

pytestmark = pytest.mark.cpu
STUDENT = StudentOptions(features=64, feature_depth=1, landmark_min=8)
HEADS, HEAD_DIM = 6, 64  # the reference model's attention


def job(layer: str, size: int, budget_mib: float) -> DistillConfig:
    return DistillConfig(
        layers=layer,
        layer_groups=1,
        teacher=TeacherConfig(sizes=(size,), steps=2, runs=12, seeds=(0, 1)),
        capture=CaptureConfig(query_cap=128, validation_fraction=0.25),
        student=STUDENT,
        training=TrainingConfig(
            updates=20,
            updates_per_capture=1,
            validation_captures=1,
            trainer=TrainerConfig(memory_budget_mib=budget_mib),
        ),
        replay=ReplayBudgets(ram_mib=64, disk_mib=0),
    )


def estimate(size: int, ladder: OomLadder) -> int:
    """The trainer's estimate for a capture of a `size` px teacher run at the ladder's caps."""
    from core.attention.student import build_student

    side = size // 16  # TAEF2's 8x and the transformer's 2x2 patches
    shape = StepShape(1, HEADS, HEAD_DIM, 128, 4 + side * side, 4, side * side)
    config = STUDENT.for_layer(HEADS, HEAD_DIM)
    params = sum(p.numel() for p in build_student(config, seed=0).parameters()) + 2
    return training_step_bytes(shape, config, ladder.caps, parameters=params)


@pytest.fixture(scope="module")
def teacher():
    from runner.models import load_model

    torch.set_num_threads(1)
    model = load_model(ModelSpec(kind="reference"), "cpu")
    return model, {0: model.make_cond()}


@pytest.fixture(scope="module")
def store(ray_cluster, tmp_path_factory):
    ram = ram_tmpdir("tsr-distill-oom-")
    cfg = ReplayConfig(
        ram_dir=str(ram),
        disk_dir=str(tmp_path_factory.mktemp("disk")),
        policy=ReplayPolicyConfig(
            ram_bytes=64 << 20,
            disk_bytes=0,
            limiter=RatioLimiterConfig(samples_per_insert=1.0, min_size=1, error_buffer=1e15),
            validation_fraction=0.25,
            seed=5,
        ),
    )
    handle = connect_store(cfg)
    try:
        yield handle
    finally:
        shutdown_store(handle)
        remove(ram)


def session(cfg: DistillConfig, teacher, states=None) -> DistillSession:
    model, conds = teacher
    return DistillSession(cfg, {0: (cfg.layers,)}, model, conds, torch.device("cpu"), states)


def key_chunk_calls(slot) -> list[int]:
    """Calls of the layer's key feature map in training forwards (a forward hook; validation runs
    without grad and is left out)."""
    calls: list[int] = []

    def count(*_) -> None:
        if torch.is_grad_enabled():
            calls.append(1)

    slot.trainer.student.phi_k.register_forward_hook(count)
    return calls


def layer_captures(store, layer: str) -> tuple[int, int]:
    import ray

    got = ray.get(store.stats.remote()).policy["layers"].get(layer, {"eligible": 0, "validation": 0})
    return got["eligible"], got["validation"]


def test_each_rung_sets_the_next_updates_caps_and_clears_the_layers_captures(teacher, store):
    rung0 = TrainCaps(query_cap=128, query_chunk=1024, key_chunk=1024, landmark_cap=STUDENT.landmark_max)
    probe = OomLadder(rung0, landmark_floor=STUDENT.landmark_min)
    rungs = [estimate(256, probe)]
    for _ in range(2):
        probe.on_oom(update=0)
        rungs.append(estimate(256, probe))
    assert rungs[0] > rungs[1] > rungs[2]
    cfg = job("single:0", 256, (rungs[1] + rungs[2]) / 2 / 2**20)
    a = session(cfg, teacher)
    slot = a.slots["single:0"]
    calls = key_chunk_calls(slot)
    state = DistillState()
    reports = []
    for i in range(3):
        reports.append(a.run(a.plan.run(i), worker=0))
        state.finish(reports[-1])
        if i < 2:  # out of memory at this run's caps: one rung down, the layer's captures gone
            assert layer_captures(store, "single:0") == (0, 0)
            assert reports[-1].layers["single:0"].new_updates == 0 and calls == []
    assert [r.layers["single:0"].ladder[-1]["rung"] for r in reports] == [1, 2, 2]
    assert [r.caps for r in slot.ladder.record()] == [r.caps for r in probe.record()] and [
        (r.caps.query_cap, r.caps.query_chunk, r.caps.key_chunk, r.caps.landmark_cap)
        for r in slot.ladder.record()
    ] == [
        (128, 1024, 1024, 512),
        (64, 512, 512, 256),
        (32, 256, 256, 128),
    ]
    trained = reports[2].layers["single:0"]
    assert trained.new_updates > 0 and not slot.ladder.stopped
    # rung 2's key chunk of 256 over 260 keys: two key feature-map calls per forward (one at rung 0)
    assert len(calls) == 2 * trained.new_updates
    assert state.ladders["single:0"] == [r.to_json() for r in slot.ladder.record()[1:]]  # job.json's

    resumed = session(cfg, teacher, a.states())
    again = resumed.slots["single:0"]
    assert again.ladder.record() == slot.ladder.record()
    calls = key_chunk_calls(again)
    report = resumed.run(resumed.plan.run(3), worker=0)
    assert report.layers["single:0"].new_updates > 0
    assert len(calls) == 2 * report.layers["single:0"].new_updates  # still rung 2's chunks


def test_after_the_last_rung_the_layer_stops_and_sampling_goes_on(teacher, store):
    cfg = job("single:1", 128, 1e-3)  # 1 KiB: below every rung
    b = session(cfg, teacher)
    plan = b.plan
    slot = b.slots["single:1"]
    for i in range(5):
        report = b.run(plan.run(i), worker=0)
        assert report.layers["single:1"].new_updates == 0
        assert layer_captures(store, "single:1") == (0, 0)
    assert slot.ladder.stopped
    record = [r.to_json() for r in slot.ladder.record()]
    assert [(r["rung"], r["stopped"], r["clear_buffer"]) for r in record] == [
        (0, False, False),
        (1, False, True),
        (2, False, True),
        (3, False, True),
        (4, False, True),
        (5, True, True),
    ]
    assert report.layers["single:1"].ladder == record[1:]

    resumed = session(cfg, teacher, b.states())
    assert resumed.slots["single:1"].ladder.stopped  # sticky across a resume
    report = resumed.run(plan.run(5), worker=0)
    # the teacher still samples; a stopped layer is no longer captured (its captures would only
    # take store bytes from the layers that still train)
    assert report.sample_s > 0 and report.layers["single:1"].new_updates == 0
    assert report.captures == 0 and layer_captures(store, "single:1") == (0, 0)
    assert report.layers["single:1"].updates == 0
