"""The rollout reward: quality against the teacher, the measured attention cost, an entropy bonus.

    R = -(w_rmse (rmse_lat + rmse_img) + w_cos (cos_lat + cos_img) + w_perc perceptual)
        - lambda |share - target(q)| + lambda_ent H,     target(q) = q * share_ready

- Quality compares the routed (student) trajectory's final latent and decoded image with the
  teacher's from the same prompt and seed: RMSE sqrt(mse + 1e-8) and cosine distance 1 - cos over
  each sample's flattened tensor, plus a perceptual distance (LPIPS-Alex, core/eval/lpips.py) of the
  decoded images when the job has its weights. A config that weighs the perceptual term (> 0) needs
  the distance: scoring without it would silently drop a term the user asked for, so it raises.
- The cost is *measured*: `share` is the attention time of the routed layers as a fraction of the
  step's attention time with every layer at full attention, from a `CostTable` of per-layer teacher
  and student timings taken at the job's resolution. A count of layers would be wrong: a layer's part
  of the step changes with the token count (softmax attention is quadratic, the student linear), and
  double and single blocks differ.
- The penalty is symmetric around the target share (routing too little and too much both cost), as
  the Flux2TTR controller's; with a one-sided penalty the policy routes every layer it may.
- The target moves with the group's quality_speed q (an input of the policy, core/control/policy.py):
  q times `share_ready`, the share of routing every ready layer. q = 0 asks for the teacher, q = 1 for
  every ready layer, and in between the policy learns which layers buy the share at the least
  quality: one policy spans the frontier instead of one fixed trade-off.
- H is the mean Bernoulli entropy of the policy over eligible layers and steps (core/control/masks.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

RMSE_EPS = 1e-8


@dataclass(frozen=True)
class LayerTiming:
    """One layer's attention call at the job's resolution: teacher (SDPA) and student, in ms."""

    layer: str
    teacher_ms: float
    student_ms: float

    def __post_init__(self) -> None:
        if not (self.teacher_ms > 0 and self.student_ms > 0):
            raise ValueError(
                f"layer {self.layer} timings must be > 0 ms, got {self.teacher_ms}, {self.student_ms}"
            )


@dataclass(frozen=True)
class CostTable:
    """Per-layer attention timings at one token grid (rows x cols latent tokens), measured once."""

    rows: int
    cols: int
    timings: tuple[LayerTiming, ...]

    def __post_init__(self) -> None:
        names = [t.layer for t in self.timings]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"cost table needs distinct layers, got {names}")

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(t.layer for t in self.timings)

    def teacher_ms(self, layers: Sequence[str]) -> torch.Tensor:
        by = {t.layer: t.teacher_ms for t in self.timings}
        missing = [k for k in layers if k not in by]
        if missing:
            raise KeyError(f"cost table ({self.rows}x{self.cols} tokens) has no timing for layers {missing}")
        return torch.tensor([by[k] for k in layers], dtype=torch.float64)

    def routed_share(self, full: torch.Tensor, layers: Sequence[str]) -> torch.Tensor:
        """[S]: per step, the teacher attention time of the routed layers (full False) over the step's
        total teacher attention time (every layer in the table)."""
        t = self.teacher_ms(layers)
        total = sum(x.teacher_ms for x in self.timings)
        return ((~full.cpu()).double() * t).sum(dim=-1) / total

    def attention_ms(self, full: torch.Tensor, layers: Sequence[str]) -> torch.Tensor:
        """[S]: the step's attention time with the routed layers on their students (others unchanged)."""
        by = {t.layer: t for t in self.timings}
        teacher = self.teacher_ms(layers)
        student = torch.tensor([by[k].student_ms for k in layers], dtype=torch.float64)
        rest = sum(x.teacher_ms for x in self.timings if x.layer not in set(layers))
        f = full.cpu().double()
        return (f * teacher + (1 - f) * student).sum(dim=-1) + rest

    def as_record(self) -> dict:
        return {"rows": self.rows, "cols": self.cols, "timings": [asdict(t) for t in self.timings]}

    @classmethod
    def from_record(cls, record: dict) -> CostTable:
        return cls(
            rows=int(record["rows"]),
            cols=int(record["cols"]),
            timings=tuple(LayerTiming(**t) for t in record["timings"]),
        )


@dataclass(frozen=True, kw_only=True)
class RewardConfig:
    rmse_weight: float = 1.0
    cosine_weight: float = 1.0
    perceptual_weight: float = 0.0  # > 0 needs a measured perceptual distance (LPIPS) in QualityTerms
    cost_weight: float = 1.0  # lambda

    def __post_init__(self) -> None:
        for name in ("rmse_weight", "cosine_weight", "perceptual_weight", "cost_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"reward {name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class QualityTerms:
    """Student vs teacher: RMSE and cosine distance on latents and on decoded images; perceptual or None."""

    latent_rmse: float
    latent_cosine: float
    image_rmse: float
    image_cosine: float
    perceptual: float | None = None


@dataclass(frozen=True)
class RewardParts:
    quality: float
    share: float
    target: float
    cost: float
    entropy: float
    total: float


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.sqrt(F.mse_loss(a.double(), b.double()) + RMSE_EPS))


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over samples of 1 - cos(a_i, b_i), each sample flattened."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    return float((1.0 - F.cosine_similarity(a, b, dim=1, eps=1e-12)).mean())


def quality_terms(
    latent: torch.Tensor,
    teacher_latent: torch.Tensor,
    image: torch.Tensor,
    teacher_image: torch.Tensor,
    perceptual: float | None = None,
) -> QualityTerms:
    return QualityTerms(
        latent_rmse=rmse(latent, teacher_latent),
        latent_cosine=cosine_distance(latent, teacher_latent),
        image_rmse=rmse(image, teacher_image),
        image_cosine=cosine_distance(image, teacher_image),
        perceptual=perceptual,
    )


def quality_loss(terms: QualityTerms, cfg: RewardConfig) -> float:
    loss = cfg.rmse_weight * (terms.latent_rmse + terms.image_rmse)
    loss += cfg.cosine_weight * (terms.latent_cosine + terms.image_cosine)
    if cfg.perceptual_weight > 0:
        if terms.perceptual is None:
            raise ValueError(
                f"reward perceptual_weight is {cfg.perceptual_weight} but no perceptual distance was measured"
            )
        loss += cfg.perceptual_weight * terms.perceptual
    return loss


def target_share(quality_speed: float, ready_share: float) -> float:
    """target(q) = q * share_ready: the routed share a group with quality_speed q is rewarded towards."""
    if not 0.0 <= quality_speed <= 1.0:
        raise ValueError(f"quality_speed must be in [0, 1], got {quality_speed}")
    return quality_speed * ready_share


def reward(
    terms: QualityTerms,
    share: float,
    entropy: float,
    cfg: RewardConfig,
    *,
    target: float,
    entropy_weight: float,
) -> RewardParts:
    """R = -quality - lambda |share - target| + lambda_ent H (share: mean routed share over steps;
    target: `target_share(q, share_ready)` of the rollout's group).

    lambda_ent is the learner's entropy weight (core/control/learner.py), the one knob for the bonus.
    """
    quality = quality_loss(terms, cfg)
    cost = abs(share - target)
    total = -quality - cfg.cost_weight * cost + entropy_weight * entropy
    return RewardParts(quality=quality, share=share, target=target, cost=cost, entropy=entropy, total=total)
