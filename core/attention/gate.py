"""Bounded per-token convex gates that mix the global branches into the exact local base.

For a global branch b (kernel or landmark) and the local base a, per (batch, head, query i):

    delta_i = 1 - cos(a_i, b_i)                          disagreement, without gradient
    dbar_i  = min(delta_i / mean_j delta_j, 3) / 3       in [0, 1]
    alpha_i = alpha_max sigmoid(l + gamma (dbar_i - 1/2))

with a learned logit l and slope gamma per head (the adaptive gate of the TTR student; LoLCATs,
arXiv 2410.10254, mixes its window and linear paths with a similar learned sigmoid per head). The
output is the convex combination

    y = (1 - alpha_kernel - alpha_landmark) local + alpha_kernel kernel + alpha_landmark landmark

Each alpha lies in [0, alpha_max] with alpha_max <= 1/2, so the local weight is at least 0 and the
weights sum to 1: y stays in the convex hull of the three branch outputs, whatever the gates learn.

The mean runs over a reference set of positions j. The student (core/attention/student.py) takes it
over fixed probes that depend only on the keys, so that a query's gate does not depend on which
other queries are evaluated with it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DISAGREEMENT_CAP = 3.0


def disagreement(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """delta = 1 - cos(a, b) over the last dim: [B, H, N] from a, b [B, H, N, d] (no gradient)."""
    with torch.no_grad():
        return 1.0 - F.cosine_similarity(a.float(), b.float(), dim=-1)


def normalised_disagreement(
    a: torch.Tensor, b: torch.Tensor, mean: torch.Tensor | None = None
) -> torch.Tensor:
    """dbar [B, H, N] in [0, 1] from outputs a, b [B, H, N, d] (no gradient).

    mean: the reference mean disagreement [B, H, 1]; None takes it over the N positions of a and b.
    Where the mean of a (batch, head) is 0 (identical branches) dbar is 0.
    """
    with torch.no_grad():
        delta = disagreement(a, b)  # [B, H, N]
        if mean is None:
            mean = delta.mean(dim=-1, keepdim=True)
        ratio = torch.where(mean > 0, delta / mean.clamp_min(torch.finfo(delta.dtype).tiny), 0.0)
        return ratio.clamp(max=DISAGREEMENT_CAP) / DISAGREEMENT_CAP


def adaptive_alpha(
    logit: torch.Tensor, gamma: torch.Tensor, dbar: torch.Tensor, *, alpha_max: float
) -> torch.Tensor:
    """alpha = alpha_max sigmoid(logit + gamma (dbar - 1/2)); logit and gamma broadcast against dbar."""
    return alpha_max * torch.sigmoid(logit + gamma * (dbar - 0.5))


def mix_branches(
    local: torch.Tensor,
    kernel: torch.Tensor,
    landmark: torch.Tensor,
    alpha_kernel: torch.Tensor,
    alpha_landmark: torch.Tensor,
) -> torch.Tensor:
    """(1 - ak - al) local + ak kernel + al landmark; alphas [B, H, N, 1] broadcast over the head dim.

    Written with the weights, not as local + ak (kernel - local) + ..., so that weights (1, 0, 0),
    (0, 1, 0) and (0, 0, 1) return each branch bit for bit.
    """
    w_local = 1.0 - alpha_kernel - alpha_landmark
    return w_local * local + alpha_kernel * kernel + alpha_landmark * landmark
