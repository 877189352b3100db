"""task: generate with a trained controller in `attention:`: quality_speed 0 keeps the teacher bit for
bit on a Ray pool, quality_speed 1 routes the ready layers the controller gives up, and each step's
decision reaches job.json."""

from __future__ import annotations

import io
import json

import pytest
import torch
import yaml

from core.control.learner import Learner, LearnerConfig
from core.control.policy import PolicyConfig
from runner.models import load_model
from runner.run import run_job
from tasks.controller import CONTROLLER_FORMAT, CONTROLLER_VERSION
from tasks.distill_attention import AttentionConfig
from tests.test_control_serving import fit_policy
from tests.test_generate_task import LAYERS, REFERENCE, generate, make_bundle

pytestmark = pytest.mark.cpu


@pytest.fixture(scope="module")
def model():
    return load_model(REFERENCE, "cpu")


def make_controller(path, students: str) -> str:
    """quality_speed 0 keeps every layer full; quality_speed 1 routes single:* (double:* stay full)."""
    learner = Learner(PolicyConfig(layers=tuple(LAYERS), hidden=16), LearnerConfig(), seed=0)
    fit_policy(learner.policy, {0.0: [3.0] * 6, 1.0: [3.0, 3.0, -3.0, -3.0, -3.0, -3.0]})
    state = learner.state_dict()
    torch.save(
        {
            "format": CONTROLLER_FORMAT, "version": CONTROLLER_VERSION,
            "policy_config": state["policy_config"], "policy": state["policy"],
            "eligible": ["double:1", "single:1"], "students": students, "cost_table": {}, "updates": 0,
        },
        path,
    )  # fmt: skip
    return str(path)


def test_controller_at_quality_zero_is_the_teacher_and_its_decisions_reach_job_json(
    ray_cluster,
    model,
    tmp_path,
):
    bundle = make_bundle(tmp_path / "students", {"double:1", "single:1"})
    controller = make_controller(tmp_path / "controller.pt", bundle)
    speed, pool = generate(
        model,
        tmp_path / "speed",
        attention=AttentionConfig(students=bundle, controller=controller, quality_speed=1),
    )
    record = pool.summary()["attention"]
    assert [d["student_layers"] for d in record["decisions"]] == [["single:1"], ["single:1"]]
    assert record["counters"]["layers"]["single:1"]["student"] == 2
    assert record["counters"]["layers"]["double:1"]["student"] == 0  # ready, but the controller keeps it
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' thread count (docs/runner.md: equality)
    try:
        teacher, _ = generate(model, tmp_path / "teacher")
    finally:
        torch.set_num_threads(threads)
    assert not torch.equal(speed.image, teacher.image)
    job = {
        "task": "generate",
        "output": str(tmp_path / "pool"),
        "pool": {"name": "genctl", "workers": 1, "device": "cpu", "cpus_per_worker": 1},
        "model": {"kind": "reference"},
        "size": [64, 64],
        "seeds": [0],
        "steps": 2,
        "attention": {"students": bundle, "controller": controller, "quality_speed": 0.0},
    }
    path = tmp_path / "gen.yaml"
    path.write_text(yaml.safe_dump(job))
    try:
        [outcome] = run_job(path, stream=(console := io.StringIO()))
    finally:
        from runner.pool.lifecycle import stop_workers

        stop_workers("genctl")
    assert torch.equal(outcome.result.image, teacher.image)
    record = json.loads((tmp_path / "pool" / "job.json").read_text())["attention"]
    assert [(d["step"], d["quality_speed"], d["student_layers"]) for d in record["decisions"]] == [
        (0, 0.0, []),
        (1, 0.0, []),
    ]
    assert record["decisions"][0]["sigma"] == pytest.approx(1.0)
    assert record["controller"] == controller and record["served_calls"] == 0
    lines = [line for line in console.getvalue().splitlines() if line.startswith("[attention]")]
    assert lines == [
        "[attention] step 0 sigma 1.0000 quality_speed 0.000 students: none",
        f"[attention] step 1 sigma {record['decisions'][1]['sigma']:.4f} quality_speed 0.000 students: none",
    ]  # each step's decision once


def test_attention_controller_settings_name_the_field():
    with pytest.raises(ValueError, match="attention.quality_speed must be in"):
        AttentionConfig(students="s", controller="c", quality_speed=-0.5)
    with pytest.raises(ValueError, match="attention.policy must be one of"):
        AttentionConfig(students="s", policy="greedy")


def test_a_controller_trained_on_another_bundle_is_refused(model, tmp_path):
    bundle = make_bundle(tmp_path / "students", {"single:1"})
    controller = make_controller(tmp_path / "controller.pt", str(tmp_path / "other"))
    with pytest.raises(ValueError, match="was trained on students"):
        generate(model, tmp_path / "o", attention=AttentionConfig(students=bundle, controller=controller))
