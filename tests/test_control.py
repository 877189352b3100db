"""core/control: the routing policy's REINFORCE math (masks, log pi, entropy, RLOO, EMA, reward,
cost table, learner, resume, inference) and the per-step mask route on the reference model."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch

from core.attention.config import StudentConfig
from core.attention.routes import StudentRoute
from core.attention.student import build_student
from core.control.baselines import EmaBaseline, rloo_advantages
from core.control.episode import ready_share
from core.control.inference import InferenceRouter
from core.control.learner import Learner, LearnerConfig, logit_bound_penalty
from core.control.mask_route import MaskRoute
from core.control.masks import draw_masks, full_probability, log_prob, mean_entropy, step_weights
from core.control.policy import PolicyConfig, PolicyInput, build_policy, policy_features
from core.control.reward import (
    CostTable,
    LayerTiming,
    QualityTerms,
    RewardConfig,
    RewardParts,
    reward,
    target_share,
)
from core.control.rollout import Rollout, RolloutState, draw_rollout_masks
from core.models.attention_hook import LayerSet, attach
from core.models.reference import load_reference

pytestmark = pytest.mark.cpu


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one thread is ~25x faster than two on a loaded 2-core machine (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


LAYERS = ("double:0", "double:1", "single:0")
REFERENCE_DIR = Path(__file__).resolve().parents[1] / "models" / "reference"
ZERO_QUALITY = QualityTerms(0.0, 0.0, 0.0, 0.0)


def bandit_rollout(group, index, plan, state, value):
    """A rollout whose reward is value(plan) (no model: a bandit)."""
    total = value(plan)
    parts = RewardParts(quality=0.0, share=0.0, target=0.0, cost=0.0, entropy=0.0, total=total)
    return Rollout(group, index, state, plan.records(), ZERO_QUALITY, parts, float(plan.log_prob.sum()))


# ---- masks, log pi, entropy, weights -----------------------------------------------------------------


def chi_square(counts: torch.Tensor, n: int, p: torch.Tensor) -> float:
    """Pearson's statistic over the two cells (full, student) of each layer."""
    expected_full, expected_student = n * p, n * (1 - p)
    return float(
        (
            (counts - expected_full) ** 2 / expected_full + (counts - expected_full) ** 2 / expected_student
        ).sum()
    )


def test_mask_frequencies_match_sigmoid_of_the_logits_chi_square():
    logits = torch.tensor([-2.0, -0.5, 0.0, 1.0, 3.0])
    n = 20000
    full = draw_masks(logits.expand(n, -1), torch.ones(n, 5, dtype=torch.bool), seed=7, floor=0.0)
    counts = full.double().sum(0)
    stat = chi_square(counts, n, torch.sigmoid(logits).double())
    assert stat < 20.52  # chi-square, 5 dof, p = 0.001
    # the single-Gumbel rule draws full with probability 1 - exp(-e^l) (0.63 at l = 0): the test rejects it
    gumbel = 1 - torch.exp(-torch.exp(logits.double()))
    assert chi_square(counts, n, gumbel) > 1000


def test_masks_are_seeded_and_non_ready_layers_are_forced_to_full_attention():
    logits = torch.full((4, 3), -10.0)
    eligible = torch.tensor([[True, False, True]] * 4)
    a = draw_masks(logits, eligible, seed=1, floor=0.0)
    assert torch.equal(a, draw_masks(logits, eligible, seed=1, floor=0.0))
    assert a[:, 1].all() and not a[:, 0].any()
    lp = log_prob(logits, a, eligible, floor=0.0)
    assert torch.allclose(
        lp, 2 * torch.log1p(-torch.sigmoid(torch.tensor(-10.0))).expand(4)
    )  # layer 1 left out


def test_log_prob_entropy_floor_and_step_weights_golden():
    logits = torch.zeros(1, 2)
    full = torch.tensor([[True, False]])
    both = torch.ones(1, 2, dtype=torch.bool)
    assert log_prob(logits, full, both, floor=0.0).item() == pytest.approx(2 * math.log(0.5))
    assert mean_entropy(logits, both, floor=0.0).item() == pytest.approx(math.log(2))
    # floor 0.1: p = 0.1 + 0.8 sigmoid(l) -> 0.1 as l -> -inf, 0.9 as l -> +inf
    p = full_probability(torch.tensor([-1e4, 1e4]), 0.1)
    assert p.tolist() == pytest.approx([0.1, 0.9])
    assert step_weights(torch.tensor([1.0, 0.75, 0.5, 0.05])).tolist() == pytest.approx(
        [0.1, 0.25, 0.5, 0.95]
    )


def test_log_pi_at_sampling_equals_the_learners_recompute():
    config = PolicyConfig(layers=LAYERS, hidden=32)
    learner = Learner(config, LearnerConfig(prob_floor=0.05), seed=3)
    with torch.no_grad():  # non-zero logits, so the check is not at the trivial p = 0.5
        learner.policy.trunk[-1].weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    state = RolloutState(cfg=1.0, rows=8, cols=12, quality_speed=0.25)
    sigmas = [1.0, 0.7, 0.3]
    plan = draw_rollout_masks(
        learner.policy, state, sigmas, frozenset({"double:0", "single:0"}), seed=11, floor=0.05
    )
    rollout = bandit_rollout(0, 0, plan, state, lambda p: 0.0)
    assert rollout.inputs() == [state.at(s) for s in sigmas]
    recomputed = learner.log_probs([rollout])[0]
    assert torch.equal(recomputed.detach(), plan.log_prob)
    assert not plan.full[:, 1].logical_not().any()  # double:1 not ready: always full


def test_policy_features_are_one_convention_and_pooled_text_is_required_when_configured():
    config = PolicyConfig(layers=LAYERS, embed_dim=8, pooled_dim=3)
    with pytest.raises(ValueError, match="inputs \\[0\\] have none"):
        policy_features([PolicyInput(sigma=0.5, cfg=1.0, rows=4, cols=4, quality_speed=0.0)], config)
    f = policy_features(
        [PolicyInput(sigma=0.5, cfg=1.0, rows=4, cols=6, quality_speed=0.5, pooled=torch.ones(3))], config
    )
    assert f["grid"].shape == (1, 16) and f["pooled"].shape == (1, 3)
    assert f["sigma"][0, 0].item() == pytest.approx(math.cos(500.0))  # first frequency is 1
    assert f["quality_speed"][0, 0].item() == pytest.approx(math.cos(500.0))  # q = 0.5 spread the same way
    # the attention call's float32 sigma and the schedule's float give one input
    f32 = float(torch.tensor(0.6, dtype=torch.float32))
    one = policy_features(
        [PolicyInput(sigma=0.6, cfg=1.0, rows=4, cols=4, quality_speed=0.0, pooled=torch.ones(3))], config
    )
    other = policy_features(
        [PolicyInput(sigma=f32, cfg=1.0, rows=4, cols=4, quality_speed=0.0, pooled=torch.ones(3))], config
    )
    assert all(torch.equal(one[k], other[k]) for k in one)
    with pytest.raises(ValueError, match="sigma must be in"):
        PolicyInput(sigma=1.5, cfg=1.0, rows=4, cols=4, quality_speed=0.0)
    with pytest.raises(ValueError, match="quality_speed must be in"):
        PolicyInput(sigma=0.5, cfg=1.0, rows=4, cols=4, quality_speed=1.5)


# ---- baselines, reward, cost ----------------------------------------------------------------------------


def test_rloo_advantages_golden_and_sum_to_zero():
    adv = rloo_advantages([1.0, 2.0, 3.0, 6.0])
    assert adv == pytest.approx([-8 / 3, -4 / 3, 0.0, 4.0])
    assert sum(adv) == pytest.approx(0.0, abs=1e-12)
    assert sum(rloo_advantages([0.3, -1.7, 2.9])) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages([1.0])


def test_ema_baseline_with_floor_golden():
    b = EmaBaseline(decay=0.5, floor=-0.3)
    # the first reward sets b = max(-1, -0.3); each advantage uses the b from before its reward
    assert b.advantages([-1.0, 1.0, 0.0]) == pytest.approx([-0.7, 1.3, -0.35])
    assert b.value == pytest.approx(0.175)


def test_cost_table_share_and_reward_golden():
    table = CostTable(
        rows=8,
        cols=8,
        timings=(
            LayerTiming("double:0", 1.0, 0.5),
            LayerTiming("single:0", 3.0, 1.0),
            LayerTiming("single:1", 4.0, 2.0),
        ),
    )
    full = torch.tensor(
        [[True, False], [False, False]]
    )  # over layers (double:0, single:0); single:1 stays full
    assert table.routed_share(full, ("double:0", "single:0")).tolist() == pytest.approx([3 / 8, 4 / 8])
    assert table.attention_ms(full, ("double:0", "single:0")).tolist() == pytest.approx([6.0, 5.5])
    assert CostTable.from_record(table.as_record()) == table
    terms = QualityTerms(
        latent_rmse=0.1, latent_cosine=0.02, image_rmse=0.2, image_cosine=0.03, perceptual=0.5
    )
    target = target_share(0.625, 0.8)  # q * share_ready = 0.5
    parts = reward(terms, 0.4, 0.6, RewardConfig(perceptual_weight=2.0), target=target, entropy_weight=0.1)
    # quality = 0.3 + 0.05 + 1.0; cost = |0.4 - 0.5|; R = -1.35 - 0.1 + 0.06
    assert parts.quality == pytest.approx(1.35) and parts.cost == pytest.approx(0.1)
    assert parts.total == pytest.approx(-1.39) and parts.target == pytest.approx(0.5)
    with pytest.raises(ValueError, match="quality_speed must be in"):
        target_share(-0.1, 0.8)


# ---- learner: bandit, resume --------------------------------------------------------------------------


SIGMAS = [0.9, 0.2]
STATE = RolloutState(cfg=1.0, rows=8, cols=8, quality_speed=0.5)


def bandit_value(plan):
    """Routing double:0 pays +1 at low sigma and -3 at high sigma; double:1 always -1; single:0 +0.5."""
    pay = torch.tensor([[-3.0, -1.0, 0.5], [1.0, -1.0, 0.5]])  # rows: sigma 0.9, 0.2
    return float((pay * (~plan.full).float()).sum())


def bandit_updates(learner, updates, *, first=0, groups=2, k=4):
    stats = []
    for u in range(first, first + updates):
        rollouts = []
        for g in range(groups):
            for i in range(k):
                plan = draw_rollout_masks(
                    learner.policy, STATE, SIGMAS, frozenset(LAYERS), seed=1000 * u + 10 * g + i, floor=0.02
                )
                rollouts.append(bandit_rollout(g, i, plan, STATE, bandit_value))
        stats.append(learner.update(rollouts[::-1]))  # order of arrival must not matter
    return stats


def test_toy_bandit_converges_to_the_known_sigma_dependent_optimum():
    learner = Learner(PolicyConfig(layers=LAYERS, hidden=64), LearnerConfig(), seed=0)
    stats = bandit_updates(learner, 80)
    with torch.no_grad():
        p = full_probability(learner.policy.logits([STATE.at(s) for s in SIGMAS]), 0.02)
    # optimum: full attention for double:0 at sigma 0.9 only and for double:1 always; single:0 routed
    optimum = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    assert (p - optimum).abs().max() < 0.1, p
    assert stats[-1].reward_mean > 1.5 > stats[0].reward_mean  # the optimum pays 2.0 (1 + 2 x 0.5)


@pytest.mark.parametrize("baseline", ["rloo", "ema"])
def test_resume_equals_an_uninterrupted_run(baseline):
    cfg = LearnerConfig(lr=1e-2, baseline=baseline)
    config = PolicyConfig(layers=LAYERS, hidden=32)
    straight = Learner(config, cfg, seed=5)
    a = bandit_updates(straight, 4)
    first = Learner(config, cfg, seed=5)
    b = bandit_updates(first, 2)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = Learner(config, cfg, seed=99)  # another seed: everything must come from the state
    resumed.load_state_dict(torch.load(buf))
    b += bandit_updates(resumed, 2, first=2)
    assert a == b
    for k, v in straight.policy_state().items():
        assert torch.equal(v, resumed.policy_state()[k]), k
    assert resumed.step == 4


# ---- inference --------------------------------------------------------------------------------------


def test_inference_threshold_and_stochastic_policies():
    policy = build_policy(PolicyConfig(layers=LAYERS, hidden=16), seed=0)  # zero last layer: p = 0.5
    ready = frozenset({"double:0", "single:0"})
    tie = InferenceRouter(policy, ready, mode="threshold", quality_speed=1.0)
    assert tie.decide(tie.state(0.5, 1.0, 8, 8), 0).student_layers == ()  # p = 1/2 keeps the teacher
    with torch.no_grad():
        policy.trunk[-1].bias.copy_(torch.tensor([-1.0, -1.0, -1.0]))  # p(full) = 0.27 for every layer
    fast = InferenceRouter(policy, ready, mode="threshold", quality_speed=0.5)
    state = fast.state(0.5, 1.0, 8, 8)
    assert state == PolicyInput(sigma=0.5, cfg=1.0, rows=8, cols=8, quality_speed=0.5)
    assert fast.decide(state, 0).student_layers == ("double:0", "single:0")  # double:1 is not ready
    assert fast.decide(state, 0) is fast.decisions[0] and len(fast.decisions) == 1  # one decision per step
    assert fast.decisions[0].as_record()["quality_speed"] == 0.5
    with pytest.raises(ValueError, match="quality_speed 0.0 from a router at 0.5"):
        fast.decide(PolicyInput(sigma=0.5, cfg=1.0, rows=8, cols=8, quality_speed=0.0), 1)
    draws = [InferenceRouter(policy, ready, mode="stochastic", quality_speed=0.5, seed=3) for _ in range(2)]
    steps = [[r.decide(state, s).student_layers for s in range(16)] for r in draws]
    assert steps[0] == steps[1] and len(set(steps[0])) > 1  # seeded by (seed, step), and it varies
    with pytest.raises(ValueError, match="quality_speed"):
        InferenceRouter(policy, ready, mode="threshold", quality_speed=1.5)


# Frontier bandit: layers A, B, C (double:0, double:1, single:0) with attention-time shares 1/4, 1/4,
# 1/2 and quality damages 0.02, 0.15, 0.05 when routed, one step. With the real reward (lambda = 1,
# target q * share_ready, share_ready = 1), enumerating the 8 masks gives one optimum per q, each
# routing exactly the target share: q = 0 none, 0.25 {A}, 0.5 {C}, 0.75 {A, C}, 1 {A, B, C}. The test
# trains on q = 0, 0.5, 1. (Trained on all five for 160 updates, q = 0.25 stayed at "none", next to
# q = 0's optimum; the other four were found.)
FRONTIER_COST = CostTable(
    rows=8, cols=8, timings=(LayerTiming("double:0", 1.0, 0.5), LayerTiming("double:1", 1.0, 0.5),
                             LayerTiming("single:0", 2.0, 0.5)),
)  # fmt: skip
FRONTIER_DAMAGE = torch.tensor([0.02, 0.15, 0.05])
FRONTIER_QS = (0.0, 0.5, 1.0)
FRONTIER_OPTIMA = {0.0: (), 0.5: ("single:0",), 1.0: LAYERS}


def frontier_updates(learner, updates, k=4):
    ready = frozenset(LAYERS)
    share_ready = ready_share(FRONTIER_COST, LAYERS, ready)
    for u in range(updates):
        rollouts = []
        for g, q in enumerate(FRONTIER_QS):
            state = RolloutState(cfg=1.0, rows=8, cols=8, quality_speed=q)
            for i in range(k):
                plan = draw_rollout_masks(
                    learner.policy, state, [0.5], ready, seed=1000 * u + 10 * g + i, floor=0.02
                )
                routed = ~plan.full[0]
                terms = QualityTerms(float((FRONTIER_DAMAGE * routed).sum()), 0.0, 0.0, 0.0)
                share = float(FRONTIER_COST.routed_share(plan.full, LAYERS)[0])
                parts = reward(terms, share, 0.0, RewardConfig(), target=target_share(q, share_ready),
                               entropy_weight=0.0)  # fmt: skip
                rollouts.append(
                    Rollout(g, i, state, plan.records(), terms, parts, float(plan.log_prob.sum()))
                )
        learner.update(rollouts)


def test_logit_bound_penalty_golden():
    # floor 0.2: L = log(0.8 / 0.2) = log 4; excess over eligible entries: (5 - L), 0, (L + 1 - L) = 1
    logits = torch.tensor([[5.0, 0.5], [-(math.log(4) + 1), 9.0]])
    eligible = torch.tensor([[True, True], [True, False]])
    expected = ((5 - math.log(4)) ** 2 + 1.0) / 3
    assert logit_bound_penalty(logits, eligible, 0.2).item() == pytest.approx(expected, rel=1e-6)
    assert logit_bound_penalty(logits, eligible, 0.0).item() == 0.0


def test_one_policy_conditioned_on_quality_speed_learns_the_whole_frontier():
    learner = Learner(PolicyConfig(layers=LAYERS, hidden=64), LearnerConfig(), seed=0)
    frontier_updates(learner, 120)
    for q, optimum in FRONTIER_OPTIMA.items():
        router = InferenceRouter(learner.policy, frozenset(LAYERS), mode="threshold", quality_speed=q)
        assert router.decide(router.state(0.5, 1.0, 8, 8), 0).student_layers == optimum, q


# ---- the per-step mask route on the reference model ----------------------------------------------------


@pytest.fixture(scope="module")
def reference():
    backbone, cond, _ = load_reference(REFERENCE_DIR)
    student = build_student(StudentConfig(heads=6, head_dim=64, landmark_min=16, local_tile=4), seed=0).eval()
    return backbone, cond, student


def test_mask_route_serves_the_students_the_step_routes_and_the_teacher_otherwise(reference):
    backbone, cond, student = reference
    x = torch.randn(1, 32, 16, 16, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.6])
    students = {"single:1": student, "single:2": student}
    layers = LayerSet.parse("all")

    def run(route, step):
        with attach(backbone.transformer, route, layers), torch.no_grad():
            return backbone.velocity(x, sigma, cond, step=step)

    with torch.no_grad():
        plain = backbone.velocity(x, sigma, cond)
    masks = {0: frozenset(), 1: frozenset({"single:2"})}
    route = MaskRoute(students, lambda rec: masks[rec.step], ready=students)
    assert torch.equal(run(route, 0), plain)
    served = run(route, 1)
    assert torch.equal(served, run(StudentRoute(students, ready=["single:2"]), 1))
    assert not torch.equal(served, plain)
    c = route.counters.layers
    assert (c["single:2"].calls, c["single:2"].student, c["single:2"].teacher) == (2, 1, 1)
    assert (c["single:1"].calls, c["single:1"].student) == (2, 0)
