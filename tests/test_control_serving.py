"""A trained controller served in a sampling loop: one decision per step, only the decided layers
serve their students, quality_speed 0 leaves the teacher's output bit for bit.

The controllers here are policies fitted by regression to given logits per quality_speed (a stand-in
for REINFORCE training, which tests/test_control.py covers), so what the tests serve is known."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.attention.config import StudentConfig
from core.attention.student import build_student
from core.control.learner import Learner, LearnerConfig
from core.control.policy import PolicyConfig, PolicyInput, RoutingPolicy, policy_features
from core.flow.sampling import sample_euler
from core.models.reference import load_reference
from runner.control.serving import ControlledStudents, load_controller
from tasks.controller import CONTROLLER_FORMAT, CONTROLLER_VERSION
from tasks.controller_attention import ControllerAttention

pytestmark = pytest.mark.cpu

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("double:0", "double:1", "single:0", "single:1", "single:2", "single:3")


def fit_policy(policy: RoutingPolicy, targets: dict[float, list[float]], *, steps: int = 300) -> None:
    """Regress the policy's logits to targets[q] (one per layer) at every sigma in [0, 1] (step 0.02,
    plus the schedules' 0.6 and 0.3), cfg 1 and 4 x 4 or 8 x 8 tokens; then check every fitted logit
    has its target's sign at those states."""
    sigmas = sorted(
        {i / 50 for i in range(51)} | {0.6, 0.3, float(torch.tensor(0.6)), float(torch.tensor(0.3))}
    )
    states = [
        PolicyInput(sigma=sg, cfg=1.0, rows=n, cols=n, quality_speed=q)
        for q in targets
        for n in (4, 8)
        for sg in sigmas
    ]
    want = torch.tensor([targets[s.quality_speed] for s in states])
    features = policy_features(states, policy.config)
    opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread (two are ~25x slower on a loaded machine)
    try:
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.mse_loss(policy(features), want).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        assert torch.equal(policy(features) > 0, want > 0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    backbone, cond, _ = load_reference(ROOT / "models" / "reference")
    learner = Learner(PolicyConfig(layers=LAYERS, hidden=16), LearnerConfig(), seed=0)
    # quality_speed 0.5: full attention for double:*, the student for single:*; 0: full everywhere
    fit_policy(learner.policy, {0.5: [6.0, 6.0, -6.0, -6.0, -6.0, -6.0], 0.0: [6.0] * 6})
    state = learner.state_dict()
    path = tmp_path_factory.mktemp("ctl") / "controller.pt"
    torch.save(
        {
            "format": CONTROLLER_FORMAT, "version": CONTROLLER_VERSION,
            "policy_config": state["policy_config"], "policy": state["policy"],
            "eligible": ["double:1", "single:1", "single:2"], "students": "s", "cost_table": {}, "updates": 0,
        },
        path,
    )  # fmt: skip
    config = StudentConfig(heads=6, head_dim=64, landmark_min=16, local_tile=4)
    students = {
        k: build_student(config, seed=i).eval() for i, k in enumerate(("double:1", "single:1", "single:2"))
    }
    return backbone, cond, load_controller(path), students


def sample(backbone, cond, served):
    x = torch.randn(1, 32, 8, 8, generator=torch.Generator().manual_seed(0))

    def model_fn(x, sigma, step):
        return backbone.velocity(x, torch.tensor([sigma]), cond, step=step)

    with torch.no_grad():
        if served is None:
            return sample_euler(model_fn, x, [1.0, 0.6, 0.3, 0.0])
        with served.routed(backbone.transformer):
            return sample_euler(model_fn, x, [1.0, 0.6, 0.3, 0.0])


def test_one_decision_per_step_routes_only_the_decided_ready_layers(setup):
    backbone, cond, controller, students = setup
    served = ControlledStudents(students, controller, ControllerAttention(controller="c", quality_speed=0.5))
    plain = sample(backbone, cond, None)
    out = sample(backbone, cond, served)
    decisions = served.take_decisions()
    assert [d.step for d in decisions] == [0, 1, 2]
    assert [d.sigma for d in decisions] == pytest.approx([1.0, 0.6, 0.3])  # the call's float32 sigma
    assert all(d.student_layers == ("single:1", "single:2") for d in decisions)  # double:1 kept full
    c = served.take_counters().layers
    assert (c["single:1"].student, c["single:2"].student, c["double:1"].student, c["double:1"].teacher) == (
        3,
        3,
        0,
        3,
    )
    assert not torch.equal(out, plain)
    assert served.take_decisions() == []


def test_quality_speed_zero_keeps_the_teacher_bit_for_bit(setup):
    backbone, cond, controller, students = setup
    served = ControlledStudents(students, controller, ControllerAttention(controller="c", quality_speed=0.0))
    assert torch.equal(sample(backbone, cond, served), sample(backbone, cond, None))
    assert served.take_counters().total().student == 0
    assert [d.quality_speed for d in served.take_decisions()] == [0.0, 0.0, 0.0]


def test_a_version_1_controller_is_refused_with_the_reason(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"format": CONTROLLER_FORMAT, "version": 1}, path)
    with pytest.raises(ValueError, match="version 1 policies do not see quality_speed"):
        load_controller(path)


def test_controller_attention_validates():
    with pytest.raises(ValueError, match="quality_speed"):
        ControllerAttention(controller="c", quality_speed=1.2)
    with pytest.raises(ValueError, match="attention.policy"):
        ControllerAttention(controller="c", policy="greedy")


def test_controller_job_config_names_the_bad_field():
    from tasks.controller_config import ControllerConfig

    with pytest.raises(ValueError, match="students must name"):
        ControllerConfig()
    with pytest.raises(ValueError, match="rollouts must be >= 2"):
        ControllerConfig(students="s", rollouts=1)
    with pytest.raises(ValueError, match="size must be a multiple of 16 pixels >= 16, got 100"):
        ControllerConfig(students="s", size=100)
    with pytest.raises(ValueError, match="baseline must be one of"):
        ControllerConfig(students="s", baseline="greedy")
    with pytest.raises(
        ValueError, match="quality_speeds must be a non-empty list in \\[0, 1\\], got \\[0.5, 2.0\\]"
    ):
        ControllerConfig(students="s", quality_speeds=(0.5, 2.0))
    cfg = ControllerConfig(students="s", prompts_per_update=2, quality_speeds=(0.0, 0.5, 1.0))
    # group g of update u: quality_speeds[(2 u + g) % 3]
    assert [cfg.group_quality_speed(u, g) for u in range(2) for g in range(2)] == [0.0, 0.5, 1.0, 0.0]
