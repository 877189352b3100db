"""A trained controller served in a sampling loop: one decision per step, only the decided layers
serve their students, quality_speed 0 leaves the teacher's output bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.attention.config import StudentConfig
from core.attention.student import build_student
from core.control.learner import Learner, LearnerConfig
from core.control.policy import PolicyConfig
from core.flow.sampling import sample_euler
from core.models.reference import load_reference
from runner.control.serving import ControlledStudents, load_controller
from tasks.controller import CONTROLLER_FORMAT, CONTROLLER_VERSION
from tasks.controller_attention import ControllerAttention

pytestmark = pytest.mark.cpu

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("double:0", "double:1", "single:0", "single:1", "single:2", "single:3")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    backbone, cond, _ = load_reference(ROOT / "models" / "reference")
    learner = Learner(PolicyConfig(layers=LAYERS, hidden=16), LearnerConfig(), seed=0)
    with torch.no_grad():  # p(full) ~ 1 for double:*, ~ 0 for single:*, whatever the state
        learner.policy.trunk[-1].bias.copy_(torch.tensor([6.0, 6.0, -6.0, -6.0, -6.0, -6.0]))
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
    with torch.no_grad():
        controller.policy.trunk[-1].bias.copy_(torch.tensor([6.0, 6.0, -1.0, -1.0, -1.0, -1.0]))  # p ~ 0.27
    try:
        served = ControlledStudents(
            students, controller, ControllerAttention(controller="c", quality_speed=0.0)
        )
        assert torch.equal(sample(backbone, cond, served), sample(backbone, cond, None))  # tau 0.1 < 0.27
        assert served.take_counters().total().student == 0
    finally:
        with torch.no_grad():
            controller.policy.trunk[-1].bias.copy_(torch.tensor([6.0, 6.0, -6.0, -6.0, -6.0, -6.0]))


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
