"""The routing policy: (sigma, cfg, latent tokens per axis, quality_speed, optional pooled text) -> one
logit per layer.

A high logit means full attention (the teacher); the probability of full attention is sigmoid(logit).
The network follows the Flux2TTR controller: sinusoidal embeddings of sigma and cfg, a resolution
embedding (an MLP on sinusoidal embeddings of the latent token grid), optionally a projection of the
pooled text vector, concatenated into a SiLU MLP trunk with one output per eligible layer.

quality_speed q in [0, 1] is an input too: the user's point on the quality/speed frontier. Training
draws q per rollout group and rewards the routed attention-time share against the target q times the
share of routing every ready layer (core/control/reward.py), so one policy learns the whole frontier
(a preference-conditioned policy); serving passes the job's q and takes the policy's most probable
action. Without q as an input the policy learns the one trade-off its reward fixed, drives its
probabilities to the exploration floor, and no threshold on them moves along a frontier
(docs/controller.md).

`policy_features` is the only place the network input is built. Sampling masks in a rollout, the
learner's log-prob recompute and inference in a job all call it with the same `PolicyInput`, in one
unit convention (sigma in [0, 1], the guidance scale, latent *tokens* per axis), so the gradient is
for the policy that acted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

SIGMA_SCALE = 1000.0  # sigma in [0, 1] embedded as a 0..1000 timestep, as the denoiser's own embedding
QUALITY_SPEED_SCALE = 1000.0  # q in [0, 1] spread the same way
CFG_SCALE = 100.0  # cfg ~ 1..10 spread over 100..1000


@dataclass(frozen=True)
class PolicyInput:
    """The state the policy sees at one diffusion step.

    sigma: flow time in [0, 1]. cfg: guidance scale (1.0 when the model has none).
    rows, cols: the latent token grid of the call (image tokens = rows x cols, after 2x2 packing).
    quality_speed: the frontier point asked for, 0 = quality (route little) .. 1 = speed (route much).
    pooled: the pooled text vector [D] or None (a policy built with pooled_dim > 0 requires it).
    """

    sigma: float
    cfg: float
    rows: int
    cols: int
    quality_speed: float
    pooled: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.sigma <= 1.0:
            raise ValueError(f"policy input sigma must be in [0, 1], got {self.sigma}")
        if not 0.0 <= self.quality_speed <= 1.0:
            raise ValueError(f"policy input quality_speed must be in [0, 1], got {self.quality_speed}")
        if self.rows < 1 or self.cols < 1:
            raise ValueError(f"policy input grid must be >= 1 x 1 tokens, got {self.rows} x {self.cols}")


def sinusoidal(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer sinusoidal embedding of scalars x [N] -> [N, dim] (cos half, sin half, max period 1e4)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    angles = x.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


@dataclass(frozen=True, kw_only=True)
class PolicyConfig:
    """layers: the eligible layer keys ("double:i", "single:i"), one logit each, in this order."""

    layers: tuple[str, ...]
    embed_dim: int = 64
    hidden: int = 256
    pooled_dim: int = 0  # 0: the policy does not see the text

    def __post_init__(self) -> None:
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"policy layers must be a non-empty list of distinct keys, got {self.layers}")
        if self.embed_dim < 2 or self.embed_dim % 2 or self.hidden < 1 or self.pooled_dim < 0:
            raise ValueError(
                f"policy needs an even embed_dim >= 2, hidden >= 1 and pooled_dim >= 0, got "
                f"{self.embed_dim}, {self.hidden}, {self.pooled_dim}"
            )

    def as_record(self) -> dict:
        return {**asdict(self), "layers": list(self.layers)}


def policy_features(inputs: Sequence[PolicyInput], config: PolicyConfig) -> dict[str, torch.Tensor]:
    """The network input for a batch of states: the one function used for sampling, recompute and
    inference. Returns float32 CPU tensors: sigma [N, E], cfg [N, E], quality_speed [N, E], grid [N, 2E],
    pooled [N, P]."""
    e = config.embed_dim
    # sigma rounded to float32 first: the attention call carries it as float32, the sampler's
    # schedule as a Python float; both must give the policy the same input.
    sigma = torch.tensor([s.sigma for s in inputs], dtype=torch.float32).double() * SIGMA_SCALE
    cfg = torch.tensor([s.cfg for s in inputs], dtype=torch.float64) * CFG_SCALE
    rows = torch.tensor([s.rows for s in inputs], dtype=torch.float64)
    cols = torch.tensor([s.cols for s in inputs], dtype=torch.float64)
    q = torch.tensor([s.quality_speed for s in inputs], dtype=torch.float64) * QUALITY_SPEED_SCALE
    out = {
        "sigma": sinusoidal(sigma, e),
        "cfg": sinusoidal(cfg, e),
        "quality_speed": sinusoidal(q, e),
        "grid": torch.cat([sinusoidal(cols, e), sinusoidal(rows, e)], dim=1),
    }
    if config.pooled_dim:
        missing = [i for i, s in enumerate(inputs) if s.pooled is None]
        if missing:
            raise ValueError(
                f"the policy sees pooled text (pooled_dim {config.pooled_dim}); inputs {missing} have none"
            )
        pooled = torch.stack([s.pooled.detach().float().cpu().reshape(-1) for s in inputs])  # type: ignore[union-attr]
        if pooled.shape[1] != config.pooled_dim:
            raise ValueError(
                f"pooled text has {pooled.shape[1]} features, the policy expects {config.pooled_dim}"
            )
        out["pooled"] = pooled
    return out


class RoutingPolicy(nn.Module):
    """logits [N, L] for policy inputs; a high logit means full attention.

    The last layer starts at zero, so every layer starts at p(full) = 0.5 whatever the input.
    """

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__()
        self.config = config
        e, h = config.embed_dim, config.hidden
        self.grid = nn.Sequential(nn.Linear(2 * e, e), nn.SiLU(), nn.Linear(e, e))
        self.text = nn.Linear(config.pooled_dim, e) if config.pooled_dim else None
        width = 4 * e + (e if config.pooled_dim else 0)
        self.trunk = nn.Sequential(
            nn.Linear(width, h), nn.SiLU(), nn.Linear(h, h), nn.SiLU(), nn.Linear(h, len(config.layers))
        )
        nn.init.zeros_(self.trunk[-1].weight)
        nn.init.zeros_(self.trunk[-1].bias)

    @property
    def layers(self) -> tuple[str, ...]:
        return self.config.layers

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = [features["sigma"], features["cfg"], features["quality_speed"], self.grid(features["grid"])]
        if self.text is not None:
            parts.append(self.text(features["pooled"]))
        return self.trunk(torch.cat(parts, dim=1))

    def logits(self, inputs: Sequence[PolicyInput]) -> torch.Tensor:
        """logits [N, L] (float32, CPU) of the states, through `policy_features`."""
        return self(policy_features(inputs, self.config))


def build_policy(config: PolicyConfig, *, seed: int) -> RoutingPolicy:
    """A policy whose initial weights are a function of the seed alone (the caller's RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return RoutingPolicy(config)
