"""`task: controller` on a real local Ray: 1 and 2 rollout workers give the same updates, a resumed
run equals an uninterrupted one, and the job records the workers' cost tables and image pairs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from core.attention.config import StudentConfig
from core.attention.student import build_student
from core.control.reward import CostTable, LayerTiming
from runner.distill.bundle import LayerEntry, StudentsBundle, save_bundle

pytestmark = [pytest.mark.cpu, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("double:0", "double:1", "single:0", "single:1", "single:2", "single:3")
SERVABLE = ("double:1", "single:1", "single:2")


def student_config() -> StudentConfig:
    return StudentConfig(heads=6, head_dim=64, landmark_min=16, local_tile=4)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """Untrained (seeded) students for three layers that may serve, one that may not."""
    folder = tmp_path_factory.mktemp("students")
    layers = {}
    for i, key in enumerate((*SERVABLE, "single:3")):
        student = build_student(student_config(), seed=i)
        ok = key in SERVABLE
        layers[key] = LayerEntry.of(key, student, ready=ok, may_serve=ok)
    save_bundle(folder, StudentsBundle(layers=layers))
    return folder


@pytest.fixture(scope="module")
def cost_file(tmp_path_factory) -> Path:
    """A fixed table, so that runs compare on one cost (measured ones differ run to run)."""
    table = CostTable(
        rows=4, cols=4, timings=tuple(LayerTiming(k, 1.0 + i, 0.5) for i, k in enumerate(LAYERS))
    )
    path = tmp_path_factory.mktemp("cost") / "cost.json"
    path.write_text(json.dumps(table.as_record()))
    return path


def run(tmp: Path, bundle: Path, cost: Path, *overrides: str):
    from runner.run import run_job

    args = [
        f"output={tmp}", f"students={bundle}", f"cost_table={cost}", "size=64", "steps=2", "rollouts=2",
        "prompts_per_update=2", "timing_repeats=1", "hidden=32", "lr=0.01", "image_every=2",
        "checkpoint_every=1", *overrides,
    ]  # fmt: skip
    [outcome] = run_job(ROOT / "clusters/controller_reference.yaml", args, stream=open(os.devnull, "w"))
    assert outcome.record["status"] == "succeeded"
    state = torch.load(tmp / "checkpoint/controller_state", weights_only=True)
    return outcome.record, state


def test_two_workers_resumed_equal_one_worker_uninterrupted(ray_cluster, bundle, cost_file, tmp_path):
    """Three short jobs: 1 worker for 3 updates; 2 workers for 2 updates, then a re-run to 3 in the same
    folder (resume). The resumed 2-worker run must hold bit for bit the 1-worker run's policy, and
    the same metrics at every update."""
    one, s1 = run(tmp_path / "one", bundle, cost_file, "workers=1", "updates=3")
    two, _ = run(tmp_path / "two", bundle, cost_file, "workers=2", "updates=2")
    resumed, s2 = run(tmp_path / "two", bundle, cost_file, "workers=2", "updates=3")
    assert resumed["records"]["resumed_from_update"] == 2
    assert s2["history"] == s1["history"]
    for k, v in s1["learner"]["policy"].items():
        assert torch.equal(v, s2["learner"]["policy"][k]), k
    assert two["records"]["groups_by_worker"] == {"0": 2, "1": 2}  # both workers ran groups
    assert one["records"]["groups_by_worker"] == {"0": 6}
    # the rollouts routed something and the learner moved
    assert 0 < s1["history"][-1]["share_mean"] and s1["history"][0]["grad_norm"] > 0
    # recorded: every worker's measured table, the table used, eligible layers; an image pair
    tables = two["records"]["worker_cost_tables"]
    assert [t["worker"] for t in tables] == [0, 1] and all(len(t["timings"]) == 6 for t in tables)
    assert two["records"]["cost_table"] == json.loads(cost_file.read_text())
    assert two["records"]["eligible_layers"] == list(SERVABLE)
    assert two["records"]["perceptual"]["weight"] == 0.0  # the perceptual term's weight as used
    assert (tmp_path / "two" / "pairs" / "update_00002.png").is_file()
    assert (tmp_path / "two" / "controller.pt").is_file()
