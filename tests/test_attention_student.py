"""The student's gate, conditioner, config and state: golden gate values, each branch exactly at the
gate's bounds, the conditioner the identity at initialisation, a state round trip, fail-closed flags."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from core.attention.conditioner import Conditioner, modulate, sinusoidal_embedding
from core.attention.config import STUDENT_FORMAT, StudentConfig
from core.attention.gate import adaptive_alpha, mix_branches, normalised_disagreement
from core.attention.geometry import TokenGeometry
from core.attention.student import Student, build_student

pytestmark = pytest.mark.cpu

GEOMETRY = TokenGeometry(3, 6, 10)
CONFIG = StudentConfig(heads=2, head_dim=16, features=64, landmark_min=8, local_tile=4)


def qkv(geometry: TokenGeometry = GEOMETRY, *, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, batch, CONFIG.heads, geometry.n, CONFIG.head_dim, generator=g).unbind(0)


@pytest.fixture(scope="module")
def student() -> Student:
    return build_student(CONFIG, seed=0).eval()


def run(student: Student, q, k, v, geometry=GEOMETRY, sigma=0.5, cfg=1.0):
    b = q.shape[0]
    with torch.no_grad():
        return student(q, k, v, geometry, torch.full((b,), sigma), torch.full((b,), cfg))


# ---- gate ------------------------------------------------------------------------------------------


def test_mix_at_the_gate_bounds_gives_each_branch_exactly():
    a, b, c = torch.randn(3, 2, 2, 5, 4).unbind(0)
    zero, one = torch.zeros(2, 2, 5, 1), torch.ones(2, 2, 5, 1)
    assert torch.equal(mix_branches(a, b, c, zero, zero), a)
    assert torch.equal(mix_branches(a, b, c, one, zero), b)
    assert torch.equal(mix_branches(a, b, c, zero, one), c)


def test_adaptive_alpha_golden_and_bounded():
    dbar = torch.tensor([0.0, 0.5, 1.0])
    # 0.5 sigmoid(0 + 2 (dbar - 1/2)) = 0.5 sigmoid(-1, 0, 1)
    alpha = adaptive_alpha(torch.tensor(0.0), torch.tensor(2.0), dbar, alpha_max=0.5)
    assert torch.allclose(alpha, torch.tensor([0.1344707, 0.25, 0.3655293]), atol=1e-7)
    assert adaptive_alpha(torch.tensor(1e4), torch.tensor(2.0), dbar, alpha_max=0.5).tolist() == [0.5] * 3
    assert adaptive_alpha(torch.tensor(-1e4), torch.tensor(2.0), dbar, alpha_max=0.5).tolist() == [0.0] * 3
    # initialisation: logit(0.1) at dbar = 1/2 gives 0.1 alpha_max = 0.05 per global branch
    init = adaptive_alpha(
        torch.tensor(math.log(0.1 / 0.9)), torch.tensor(2.0), torch.tensor(0.5), alpha_max=0.5
    )
    assert abs(init.item() - 0.05) < 1e-7


def test_normalised_disagreement_golden():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    a = e1.expand(4, 2)[None, None]
    b = torch.stack([e1, e2, -e1, e1 + e2])[None, None]
    # delta = 1 - cos = 0, 1, 2, 1 - 1/sqrt(2); mean 0.8232233; dbar = min(delta / mean, 3) / 3
    expected = torch.tensor([0.0, 0.4049155, 0.8098311, 0.1185956])
    assert torch.allclose(normalised_disagreement(a, b)[0, 0], expected, atol=1e-6)
    # one outlier among zeros: 10 x the mean, capped at 3 -> 1
    b = e1.expand(10, 2).clone()
    b[3] = e2
    assert normalised_disagreement(e1.expand(10, 2)[None, None], b[None, None])[0, 0, 3].item() == 1.0
    assert normalised_disagreement(a, a).abs().max().item() == 0.0  # identical branches: 0, not NaN


# ---- conditioner -----------------------------------------------------------------------------------


def test_sinusoidal_embedding_golden():
    # dim 4: frequencies 10000^(-k / 1), k = 0, 1 -> 1, 1e-4; halves sin, cos
    emb = sinusoidal_embedding(torch.tensor([0.0, 1.0]), 4)
    assert torch.allclose(emb[0], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    assert torch.allclose(
        emb[1], torch.tensor([math.sin(1.0), math.sin(1e-4), math.cos(1.0), math.cos(1e-4)])
    )


def test_conditioner_is_the_identity_at_init(student):
    mod = Conditioner()(torch.tensor([0.0, 0.3, 1.0]), torch.tensor([1.0, 3.5, 7.0]))
    assert all(torch.equal(m, torch.zeros(3)) for m in mod)
    x = torch.randn(3, 2, 5, 4)
    assert torch.equal(modulate(x, mod.scale_kernel, mod.shift_kernel), x)
    q, k, v = qkv()
    early, late = run(student, q, k, v, sigma=0.95, cfg=1.0), run(student, q, k, v, sigma=0.05, cfg=6.0)
    assert torch.equal(early.out, late.out)
    # and it is a real input once trained: a non-zero last layer makes sigma matter
    trained = build_student(CONFIG, seed=0).eval()
    with torch.no_grad():
        trained.conditioner.net[-1].weight.normal_()
    assert not torch.equal(run(trained, q, k, v, sigma=0.95).out, run(trained, q, k, v, sigma=0.05).out)


# ---- the assembled student -------------------------------------------------------------------------


def test_student_with_covering_window_and_closed_gates_is_softmax_attention():
    config = StudentConfig(heads=2, head_dim=16, features=64, landmark_min=8, local_tile=4, local_radius=2)
    s = build_student(config, seed=0).eval()
    with torch.no_grad():
        for p in (s.logit_kernel, s.logit_landmark):
            p.fill_(-1e4)  # alpha = 0: the output is the local branch, here exact softmax
    q, k, v = qkv()
    out = run(s, q, k, v).out
    assert (out - F.scaled_dot_product_attention(q, k, v)).abs().max() <= 1e-5


def test_student_text_queries_take_exact_attention(student):
    q, k, v = qkv()
    result = run(student, q, k, v)
    n_text = GEOMETRY.n_text
    exact = F.scaled_dot_product_attention(q[:, :, :n_text], k, v)
    assert (result.out[:, :, :n_text] - exact).abs().max() <= 1e-5
    # image queries mix the global branches in: not the local window alone
    local = student.branches(q, k, v, GEOMETRY).local
    assert (result.out[:, :, n_text:] - local[:, :, n_text:]).abs().max() > 1e-3
    assert result.nonfinite == () and result.min_denominator > 0


def test_student_does_not_depend_on_batching(student):
    q, k, v = qkv(batch=3)
    together = run(student, q, k, v).out
    alone = torch.cat([run(student, q[i : i + 1], k[i : i + 1], v[i : i + 1]).out for i in range(3)])
    assert torch.allclose(together, alone, rtol=1e-5, atol=1e-6)


def test_student_reports_nonfinite_branches():
    s = build_student(CONFIG, seed=0).eval()
    with torch.no_grad():
        s.phi_k.mlp[-1].bias.fill_(float("nan"))
    result = run(s, *qkv())
    assert result.nonfinite == ("kernel", "output")
    q, k, v = qkv()
    v[0, 0, 1, 0] = float("inf")  # a text token's value: every branch reads it
    result = run(build_student(CONFIG, seed=0).eval(), q, k, v)
    assert result.nonfinite == ("local", "kernel", "landmark", "output")


def test_student_rejects_a_layer_of_another_shape(student):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="heads, n, head_dim"):
        run(student, q, k, v, geometry=TokenGeometry(4, 6, 10))


# ---- config and state ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [("features", 100), ("features", 8192), ("alpha_max", 0.6), ("landmark_max", 4), ("local_radius", -1)],
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"student.{field} .*{value}"):
        StudentConfig(heads=2, head_dim=16, **{field: value})


def test_state_dict_round_trip_rebuilds_the_student(student):
    state = student.state_dict()
    assert state["_extra_state"] == {"format": STUDENT_FORMAT, "config": CONFIG.__dict__}
    rebuilt = Student.from_state_dict(state).eval()
    assert rebuilt.config == CONFIG
    q, k, v = qkv()
    assert torch.equal(run(rebuilt, q, k, v).out, run(student, q, k, v).out)
    with pytest.raises(ValueError, match="format"):
        Student.from_state_dict({**state, "_extra_state": {**state["_extra_state"], "format": 99}})
    other = build_student(StudentConfig(heads=2, head_dim=16, features=128), seed=0)
    with pytest.raises((ValueError, RuntimeError)):
        other.load_state_dict(state)
