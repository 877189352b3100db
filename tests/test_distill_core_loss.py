"""The distillation loss: golden numbers derived by hand, the log-variance clamp and its gradient."""

from __future__ import annotations

import math

import pytest
import torch

from core.distill.loss import DistillLossConfig, KendallWeights, distill_loss

pytestmark = pytest.mark.cpu

# Two tokens of one head, D = 2: token 0 exact, token 1 orthogonal to its teacher.
OUT = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
TEACHER = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
# By hand: differences 0, 0, -1, 1; Smooth-L1 (beta 0.05) of |1| is 1 - 0.025 = 0.975, mean over the
# 4 elements 0.4875. Cosines 1 and 0: distance 1 - 0.5 = 0.5. MSE 2/4 = 0.5 over mean t^2 = 0.5: NMSE 1.
L1, LCOS, NMSE = 0.4875, 0.5, 1.0


def weights(s1: float, s2: float) -> KendallWeights:
    w = KendallWeights()
    with torch.no_grad():
        w.s_l1.fill_(s1)
        w.s_cos.fill_(s2)
    return w


def test_loss_parts_golden_at_init():
    parts = distill_loss(OUT, TEACHER, KendallWeights(), DistillLossConfig())
    assert parts.smooth_l1.item() == pytest.approx(L1, abs=1e-7)
    assert parts.cosine_distance.item() == pytest.approx(LCOS, abs=1e-7)
    assert parts.nmse.item() == pytest.approx(NMSE, abs=1e-7)
    assert parts.total.item() == pytest.approx(L1 + LCOS, abs=1e-7)  # s = 0: weights 1, offsets 0


def test_loss_total_golden_with_log_variances():
    parts = distill_loss(OUT, TEACHER, weights(1.0, -1.0), DistillLossConfig())
    expected = math.exp(-1.0) * L1 + 1.0 + math.exp(1.0) * LCOS - 1.0  # 1.5384847
    assert parts.total.item() == pytest.approx(expected, abs=1e-6)


def test_smooth_l1_quadratic_below_beta():
    out = TEACHER + torch.tensor([0.01, -0.01])  # |x| = 0.01 < beta: 0.5 x^2 / beta = 1e-3
    assert distill_loss(
        out, TEACHER, KendallWeights(), DistillLossConfig()
    ).smooth_l1.item() == pytest.approx(1e-3, rel=1e-5)


def test_log_variances_are_clamped_and_keep_a_gradient_at_the_bound():
    cfg = DistillLossConfig(logvar_min=-2.0, logvar_max=3.0)
    w = weights(10.0, -10.0)
    parts = distill_loss(OUT, TEACHER, w, cfg)
    assert parts.total.item() == pytest.approx(
        math.exp(-3.0) * L1 + 3.0 + math.exp(2.0) * LCOS - 2.0, abs=1e-5
    )
    w.project_(cfg)
    assert (w.s_l1.item(), w.s_cos.item()) == (3.0, -2.0)
    distill_loss(OUT, TEACHER, w, cfg).total.backward()
    # d/ds (exp(-s) L + s) = 1 - exp(-s) L: at the bounds the gradient still flows
    assert w.s_l1.grad.item() == pytest.approx(1 - math.exp(-3.0) * L1, abs=1e-6)
    assert w.s_cos.grad.item() == pytest.approx(1 - math.exp(2.0) * LCOS, abs=1e-6)


def test_loss_gradient_reaches_the_output_only_through_total():
    out = OUT.clone().requires_grad_(True)
    parts = distill_loss(out, TEACHER, KendallWeights(), DistillLossConfig())
    assert not parts.smooth_l1.requires_grad and not parts.nmse.requires_grad
    parts.total.backward()
    assert out.grad.abs().sum().item() > 0


@pytest.mark.parametrize(
    ("field", "value"), [("beta", 0.0), ("logvar_min", 5.0), ("logvar_max", -1.0), ("logvar_min", 1.0)]
)
def test_loss_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        DistillLossConfig(**{field: value})


def test_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        distill_loss(OUT, TEACHER[:, :, :1], KendallWeights(), DistillLossConfig())
