"""The controller reward's perceptual term: LPIPS of the routed image against the teacher's in a real
rollout group (seeded LPIPS weights, since the AlexNet checkpoint is not on CI machines), the job's
pre-flight refusal when the term is asked for without the backbone, and the record of the weight."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.attention.config import StudentConfig
from core.attention.student import build_student
from core.control.episode import EpisodeConfig, EpisodeModel, GroupTask, run_group, trajectory
from core.control.policy import PolicyConfig, build_policy
from core.control.reward import CostTable, LayerTiming, RewardConfig, quality_loss
from core.eval.lpips import LpipsAlex, lpips_distance
from core.models.loading import ModelSpec
from runner.config import JobConfigError, load_job
from runner.control.job import check, perceptual_record
from runner.models import load_model
from runner.perceptual import ALEXNET_FILE
from runner.run import check_job
from tasks.controller_config import ControllerConfig

pytestmark = pytest.mark.cpu

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("double:0", "double:1", "single:0", "single:1", "single:2", "single:3")


def seeded_lpips() -> LpipsAlex:
    """LPIPS-Alex with seeded random trunk and non-negative heads (the published heads are >= 0)."""
    torch.manual_seed(0)
    model = LpipsAlex()
    with torch.no_grad():
        for head in model.heads:
            head.model[1].weight.abs_()
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def episode():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    loaded = load_model(ModelSpec(), "cpu")
    config = StudentConfig(heads=6, head_dim=64, landmark_min=16, local_tile=4)
    students = {k: build_student(config, seed=i).eval() for i, k in enumerate(("single:1", "single:2"))}
    model = EpisodeModel(loaded.backbone, loaded.vae.decode, loaded.make_cond(), students, seeded_lpips())
    cost = CostTable(rows=4, cols=4, timings=tuple(LayerTiming(k, 1.0, 0.5) for k in LAYERS))
    yield model, cost
    torch.set_num_threads(threads)


def episode_config(weight: float) -> EpisodeConfig:
    return EpisodeConfig(
        latent_h=8, latent_w=8, steps=2, rollouts=2, job_seed=0, prob_floor=0.02, entropy_weight=0.01,
        reward=RewardConfig(perceptual_weight=weight),
    )  # fmt: skip


def test_rollout_reward_carries_lpips_of_routed_vs_teacher_image(episode):
    model, cost = episode
    cfg = episode_config(2.0)
    policy = build_policy(PolicyConfig(layers=LAYERS, hidden=16), seed=0)
    teacher, rollouts = run_group(model, policy, cost, cfg, GroupTask(0, 0, 11, 0.5))
    assert teacher.image.shape[-2:] == (64, 64)
    routed_any = False
    for rollout, traj in rollouts:
        expected = lpips_distance(model.perceptual, traj.image, teacher.image)  # recomputed independently
        assert rollout.quality.perceptual == expected
        base = quality_loss(rollout.quality, RewardConfig(perceptual_weight=0.0))
        assert rollout.reward.quality == pytest.approx(base + 2.0 * expected, rel=1e-12)
        assert rollout.reward.target == pytest.approx(0.5 * 2 / 6)  # q * share of the 2 ready layers of 6
        routed_any |= not torch.equal(traj.image, teacher.image)
        if not torch.equal(traj.image, teacher.image):
            assert expected > 0  # a routed image differs perceptually
    assert routed_any
    # the teacher against itself: distance 0 (the term measures the routing, nothing else)
    again = trajectory(model, cfg, 11, None, policy.layers)
    assert lpips_distance(model.perceptual, again.image, teacher.image) == 0.0


def test_a_weighted_perceptual_term_without_a_distance_is_refused(episode):
    model, cost = episode
    no_lpips = EpisodeModel(model.backbone, model.decode, model.cond, model.students)
    policy = build_policy(PolicyConfig(layers=LAYERS, hidden=16), seed=0)
    with pytest.raises(ValueError, match="perceptual_weight is 0.5 but no perceptual distance was measured"):
        run_group(no_lpips, policy, cost, episode_config(0.5), GroupTask(0, 0, 11, 0.5))


def test_controller_job_asking_for_lpips_without_the_backbone_fails_before_work(tmp_path):
    missing = tmp_path / "nowhere" / ALEXNET_FILE
    job = load_job(
        ROOT / "clusters/controller_reference.yaml",
        [f"output={tmp_path / 'out'}", "perceptual_weight=0.5", f"lpips_backbone={missing}"],
    )
    with pytest.raises(
        JobConfigError, match=f"perceptual_weight 0.5 needs LPIPS.*'{missing}' does not exist"
    ):
        check_job(job)
    assert not (tmp_path / "out").exists()
    cfg = ControllerConfig(students="s", lpips_backbone=str(missing))  # weight 0: no LPIPS needed
    check(cfg)
    record = perceptual_record(cfg)
    assert record["weight"] == 0.0 and record["lpips"]["measured"] is False
    assert record["lpips"]["backbone"] == str(missing)
    assert cfg.reward().perceptual_weight == 0.0
    assert ControllerConfig(students="s", perceptual_weight=0.25).reward().perceptual_weight == 0.25
    with pytest.raises(ValueError, match="perceptual_weight must be >= 0, got -1"):
        ControllerConfig(students="s", perceptual_weight=-1.0)
