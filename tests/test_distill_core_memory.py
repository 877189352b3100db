"""The OOM ladder's caps in the student and the trainer: the training-step memory estimate (golden
numbers), per-call forward limits (the landmark cap equals a student configured with it, the chunks
are the calls the feature maps see, the config stays), and the trainer's memory budget raising
torch.OutOfMemoryError before it touches anything."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from test_distill_core_trainer import CONFIG, make_capture

from core.attention.config import ForwardLimits
from core.attention.geometry import TokenGeometry
from core.attention.student import build_student, gate_probes
from core.distill.loss import DistillLossConfig
from core.distill.memory import StepShape, training_step_bytes
from core.distill.oom_ladder import OomLadder, TrainCaps
from core.distill.trainer import LayerTrainer, TrainerConfig, capture_geometry

pytestmark = pytest.mark.cpu

CAPS = TrainCaps(query_cap=16, query_chunk=64, key_chunk=256, landmark_cap=32)


def test_training_step_bytes_golden():
    # By hand (core/distill/memory.py): d 16, F 64, hidden max(16, 128) x depth 2 = 256; nq = 16 + 64
    # probes = 80; qc = 64; kc = min(256, 67) = 67; landmarks: round(0.08 x 64) = 5 -> min 8, L = 3 + 8;
    # window 3 + 4^2 = 19. held 3*80*16 + 2*67*16 = 5984; kernel 64*16 + 64 + 131*336 = 45104;
    # landmark 2*11*16 + 64*27 = 2080; local 80*35 = 2800; sum 55968.
    # (4 * 2 heads * 55968 * 2 + 4 * 4 * 1000 parameters) * 1.1 = 1002636.8
    shape = StepShape(batch=1, heads=2, head_dim=16, queries=24, tokens=67, text=3, image=64)
    assert training_step_bytes(shape, CONFIG, CAPS, parameters=1000) == 1002636
    # the query cap above the capture's queries changes nothing; each halving lowers the estimate
    at = lambda cap: training_step_bytes(shape, CONFIG, replace(CAPS, query_cap=cap), parameters=1000)  # noqa: E731
    assert at(64) == at(24) > at(12)
    big = StepShape(batch=1, heads=2, head_dim=16, queries=512, tokens=4100, text=4, image=4096)
    wide = TrainCaps(query_cap=512, query_chunk=1024, key_chunk=1024, landmark_cap=512)
    ladder, before = OomLadder(wide, landmark_floor=CONFIG.landmark_min), None
    for _ in range(3):
        now = training_step_bytes(big, CONFIG, ladder.caps, parameters=1000)
        assert before is None or now < before
        before = now
        ladder.on_oom(update=0)


def geometry() -> TokenGeometry:
    return TokenGeometry(3, 8, 8)


def test_landmark_cap_is_a_per_call_override():
    config = replace(CONFIG, landmark_fraction=0.5)  # 32 landmarks on the 8 x 8 grid: the cap binds
    student = build_student(config, seed=1)
    capped = build_student(replace(config, landmark_max=16), seed=1)  # same weights, the cap in its config
    capture = make_capture(0)
    q, k, v = capture.q_sub, capture.k, capture.v
    s, c = torch.tensor([0.5]), torch.tensor([1.0])
    idx = capture.query_index
    with torch.no_grad():
        out = student(q, k, v, geometry(), s, c, query_index=idx, limits=ForwardLimits(landmark_cap=16))
        want = capped(q, k, v, geometry(), s, c, query_index=idx)
        free = student(q, k, v, geometry(), s, c, query_index=idx)
    assert torch.equal(out.out, want.out)
    assert not torch.allclose(out.out, free.out, atol=1e-6)  # the cap changed this call
    assert student.config == config  # and only this call


def test_chunk_limits_are_the_calls_the_feature_maps_see():
    student = build_student(CONFIG, seed=2)
    calls = {"phi_q": 0, "phi_k": 0}
    for name in calls:
        getattr(student, name).register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))
    capture = make_capture(1)
    s, c, idx = torch.tensor([0.5]), torch.tensor([1.0]), capture.query_index
    with torch.no_grad():
        ref = student(capture.q_sub, capture.k, capture.v, geometry(), s, c, query_index=idx)
        assert calls == {"phi_q": 2, "phi_k": 1}  # queries and probes, one chunk each; keys in one
        calls.update(phi_q=0, phi_k=0)
        limits = ForwardLimits(query_chunk=8, key_chunk=16)
        out = student(capture.q_sub, capture.k, capture.v, geometry(), s, c, query_index=idx, limits=limits)
    probes = len(gate_probes(geometry()))
    assert calls == {"phi_q": math.ceil(24 / 8) + math.ceil(probes / 8), "phi_k": math.ceil(67 / 16)}
    torch.testing.assert_close(out.out, ref.out, rtol=1e-5, atol=1e-6)  # only the order of fp32 sums


def test_the_trainer_threads_every_cap_into_the_forward():
    t = LayerTrainer(build_student(CONFIG, seed=3), TrainerConfig(), DistillLossConfig(), seed=3)
    calls = {"phi_q": 0, "phi_k": 0}
    for name in calls:
        getattr(t.student, name).register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))
    caps = TrainCaps(query_cap=16, query_chunk=8, key_chunk=16, landmark_cap=8)
    assert t.update([make_capture(2)], caps=caps).finite
    probes = len(gate_probes(geometry()))
    assert calls == {"phi_q": 16 // 8 + math.ceil(probes / 8), "phi_k": math.ceil(67 / 16)}
    assert t.student.config == CONFIG


def test_memory_budget_raises_out_of_memory_before_the_step():
    capture = make_capture(3)
    probe = LayerTrainer(build_student(CONFIG, seed=4), TrainerConfig(), DistillLossConfig(), seed=4)
    rung0, rung1 = (
        probe.default_caps(24),
        TrainCaps(query_cap=12, query_chunk=512, key_chunk=512, landmark_cap=256),
    )
    high, low = probe.step_bytes(capture, rung0), probe.step_bytes(capture, rung1)
    assert low < high
    budget = (low + high) / 2 / 2**20
    t = LayerTrainer(
        build_student(CONFIG, seed=4), TrainerConfig(memory_budget_mib=budget), DistillLossConfig(), seed=4
    )
    before = {k: v.clone() for k, v in t.student.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(torch.OutOfMemoryError, match="memory_budget_mib"):
        t.update([capture], caps=rung0)
    assert t.updates == t.skipped == 0
    assert all(torch.equal(v, t.student.state_dict()[k]) for k, v in before.items())
    assert t.update([capture], caps=rung1).finite and t.updates == 1
    assert capture_geometry(capture) == geometry()


def test_evaluate_builds_no_autograd_graph():
    """Validation holds no activations for a backward (inference_mode(False) alone turns grad on)."""
    t = LayerTrainer(build_student(CONFIG, seed=5), TrainerConfig(), DistillLossConfig(), seed=5)
    seen = []
    t.student.register_forward_hook(lambda module, args, out: seen.append(out.out.requires_grad))
    with torch.inference_mode():  # as a worker calls it, between teacher runs
        t.evaluate([make_capture(4)])
        t.update([make_capture(4)])
    assert seen == [False, True]
