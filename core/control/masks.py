"""Per-step routing masks: Bernoulli draws, their log-probability and entropy, and step weights.

A mask holds one boolean per (step, layer): True = full attention (the teacher), False = the layer's
student. Layers that are not eligible (no ready student) are forced to full attention; they are no
action of the policy, so they are left out of log pi and of the entropy.

Decisions:
- mask ~ Bernoulli(p), drawn as u < p with u uniform from a CPU generator seeded by the caller, and
  log pi is the log-probability under that same Bernoulli(p). (Adding a single Gumbel sample to the
  logit and thresholding at 0.5, as the Flux2TTR controller did, draws full attention with
  probability 1 - exp(-e^l), 0.63 at l = 0, while its log pi was Bernoulli(sigmoid(l)): a biased
  REINFORCE estimator, and its temperature never changed a hard mask.)
- The probability floor mixes rather than clamps: p = eps + (1 - 2 eps) sigmoid(l), so a layer the
  policy has gated off keeps being explored (p(student) >= eps), and sampling, log pi and entropy all
  use this one p. The floor bounds p, not the logit: the log pi gradient still decays as
  sigmoid(l) (1 - sigmoid(l)) once l runs away, so the learner bounds the logits (core/control/learner.py).
"""

from __future__ import annotations

import torch

from core.flow.seeds import cpu_generator

STEP_WEIGHT_FLOOR = 0.1


def full_probability(logits: torch.Tensor, floor: float) -> torch.Tensor:
    """p(full attention) = floor + (1 - 2 floor) sigmoid(logits), floor in [0, 0.5)."""
    if not 0.0 <= floor < 0.5:
        raise ValueError(f"probability floor must be in [0, 0.5), got {floor}")
    return floor + (1.0 - 2.0 * floor) * torch.sigmoid(logits)


def draw_masks(logits: torch.Tensor, eligible: torch.Tensor, *, seed: int, floor: float) -> torch.Tensor:
    """full [S, L] bool: Bernoulli(p) for eligible layers, True (full attention) for the others.

    logits, eligible: [S, L]. The uniforms come from a CPU generator seeded by `seed` at the full
    shape, so a mask is a function of (seed, logits) only.
    """
    if logits.shape != eligible.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and eligibility {tuple(eligible.shape)} differ")
    p = full_probability(logits.detach().float().cpu(), floor)
    u = torch.rand(tuple(p.shape), generator=cpu_generator(seed), dtype=torch.float32)
    return (u < p) | ~eligible.cpu()


def log_prob(
    logits: torch.Tensor, full: torch.Tensor, eligible: torch.Tensor, *, floor: float
) -> torch.Tensor:
    """Sum over eligible layers of log Bernoulli(full | p), per step: [S] (differentiable in logits)."""
    p = full_probability(logits, floor)
    lp = torch.where(full, torch.log(p), torch.log1p(-p))
    return (lp * eligible.to(lp.dtype)).sum(dim=-1)


def bernoulli_entropy(p: torch.Tensor) -> torch.Tensor:
    """-p log p - (1 - p) log(1 - p), elementwise (p strictly inside (0, 1), as the floor keeps it)."""
    return -(p * torch.log(p) + (1 - p) * torch.log1p(-p))


def mean_entropy(logits: torch.Tensor, eligible: torch.Tensor, *, floor: float) -> torch.Tensor:
    """Mean Bernoulli entropy over eligible (step, layer) entries; 0 when nothing is eligible."""
    h = bernoulli_entropy(full_probability(logits, floor)) * eligible.to(logits.dtype)
    count = eligible.sum()
    return h.sum() / count if count > 0 else h.sum() * 0.0


def step_weights(sigmas: torch.Tensor) -> torch.Tensor:
    """w_s = max(0.1, 1 - sigma_s / sigma_max) [S]: late (low-sigma) steps, where routing shows in the
    image, weigh most; early ones keep a floor so that they still learn."""
    sigma_max = sigmas.max()
    if sigma_max <= 0:
        return torch.ones_like(sigmas)
    return torch.clamp(1.0 - sigmas / sigma_max, min=STEP_WEIGHT_FLOOR)
