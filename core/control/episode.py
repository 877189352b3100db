"""One group of REINFORCE rollouts: the teacher trajectory of a prompt and seed, and K routed ones.

For a group (update u, group g, seed s, quality_speed q) the worker:
1. samples the teacher (every layer at full attention) from the seed's noise and decodes it;
2. for k = 0..K-1 draws a mask for every step from the policy it was sent (seeded by (job seed,
   u, g, k), core/control/rollout.py), samples again from the *same* noise with a `MaskRoute` serving
   the masked layers' students, and decodes;
3. scores each routed trajectory against the teacher (core/control/reward.py) with the measured
   attention cost of its masks (the worker's `CostTable`) against the group's target share
   q * share_ready, and the policy's entropy at those states;
   with an LPIPS module (`EpisodeModel.perceptual`) the decoded images' LPIPS distance too.

Common random numbers (one noise for the teacher and all K rollouts) make the K rewards differ only
by the routing, which is what RLOO's leave-one-out baseline compares. Everything is a function of
(model, students, policy weights, task), so it does not matter which worker runs a group.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from core.attention.student import Student
from core.control.mask_route import MaskRoute
from core.control.masks import mean_entropy
from core.control.policy import RoutingPolicy
from core.control.reward import CostTable, RewardConfig, quality_terms, reward, target_share
from core.control.rollout import MaskPlan, Rollout, RolloutState, draw_rollout_masks, eligibility
from core.eval.lpips import LpipsAlex, lpips_distance
from core.flow.generation import generation_noise, generation_sigmas
from core.flow.sampling import sample_euler
from core.flow.seeds import derive_seed
from core.models.attention_hook import LayerSet, attach
from core.models.backbone import Cond


@dataclass(frozen=True)
class GroupTask:
    """The g-th prompt/seed group of update u; `seed` is the generation seed (noise); `quality_speed`
    the frontier point the group's rollouts are rewarded for (and the policy sees)."""

    update: int
    group: int
    seed: int
    quality_speed: float


@dataclass(frozen=True, kw_only=True)
class EpisodeConfig:
    latent_h: int
    latent_w: int
    steps: int
    rollouts: int  # K per group
    job_seed: int
    prob_floor: float
    entropy_weight: float
    reward: RewardConfig

    def __post_init__(self) -> None:
        if self.latent_h < 2 or self.latent_w < 2 or self.latent_h % 2 or self.latent_w % 2:
            raise ValueError(f"episode latent must be even and >= 2, got {self.latent_h}x{self.latent_w}")
        if self.steps < 1 or self.rollouts < 2:
            raise ValueError(
                f"episode needs steps >= 1 and rollouts >= 2 (RLOO), got {self.steps}, {self.rollouts}"
            )


@dataclass
class EpisodeModel:
    """What a worker holds: the denoiser, its VAE decode, the conditioning and the ready students;
    `perceptual`, the LPIPS module of the reward's perceptual term (None: the term is not measured)."""

    backbone: torch.nn.Module
    decode: Callable[[torch.Tensor], torch.Tensor]  # latents [1, C, h, w] -> images [1, 3, H, W] in [0, 1]
    cond: Cond
    students: Mapping[str, Student]
    perceptual: LpipsAlex | None = None

    @property
    def ready(self) -> frozenset[str]:
        return frozenset(self.students)


@dataclass(frozen=True)
class Trajectory:
    latent: torch.Tensor
    image: torch.Tensor


def episode_state(model: EpisodeModel, cfg: EpisodeConfig, quality_speed: float) -> RolloutState:
    guidance = model.cond.guidance
    return RolloutState(
        cfg=1.0 if guidance is None else float(guidance),
        rows=cfg.latent_h // 2,
        cols=cfg.latent_w // 2,
        quality_speed=quality_speed,
    )


def ready_share(cost: CostTable, layers: Sequence[str], ready: frozenset[str]) -> float:
    """The routed share of one step with every ready layer on its student."""
    full = ~eligibility(tuple(layers), ready, 1)
    return float(cost.routed_share(full, layers)[0])


def episode_sigmas(cfg: EpisodeConfig) -> list[float]:
    return generation_sigmas(cfg.latent_h, cfg.latent_w, cfg.steps)


@torch.no_grad()
def trajectory(
    model: EpisodeModel, cfg: EpisodeConfig, seed: int, plan: MaskPlan | None, layers: Sequence[str]
) -> Trajectory:
    """Sample from the seed's noise; with a plan, each step's routed layers serve their students."""
    backbone = model.backbone
    x = generation_noise(backbone.latent_channels, cfg.latent_h, cfg.latent_w, seed)
    param = next(backbone.parameters())
    x = x.to(device=param.device, dtype=param.dtype)

    def model_fn(x: torch.Tensor, sigma: float, step: int) -> torch.Tensor:
        s = torch.full((x.shape[0],), sigma, device=x.device, dtype=torch.float32)
        return backbone.velocity(x, s, model.cond, step=step)

    sigmas = episode_sigmas(cfg)
    if plan is None or not model.students:
        latent = sample_euler(model_fn, x, sigmas)
    else:
        route = MaskRoute(
            model.students, lambda rec: plan.student_layers(rec.step, layers), ready=model.students
        )
        with attach(backbone.transformer, route, LayerSet.parse(",".join(model.students))):
            latent = sample_euler(model_fn, x, sigmas)
    return Trajectory(latent.float().cpu(), model.decode(latent).float().cpu())


def mask_seed(cfg: EpisodeConfig, task: GroupTask, k: int) -> int:
    return derive_seed(cfg.job_seed, "controller-mask", task.update, task.group, k)


def perceptual_of(model: EpisodeModel, routed: Trajectory, teacher: Trajectory) -> float | None:
    """LPIPS(routed image, teacher image), or None when the worker has no LPIPS module."""
    if model.perceptual is None:
        return None
    device = next(model.perceptual.parameters()).device
    return lpips_distance(model.perceptual, routed.image.to(device), teacher.image.to(device))


def run_group(
    model: EpisodeModel, policy: RoutingPolicy, cost: CostTable, cfg: EpisodeConfig, task: GroupTask
) -> tuple[Trajectory, list[tuple[Rollout, Trajectory]]]:
    """The teacher trajectory and the K rollouts (with their trajectories) of one group."""
    state = episode_state(model, cfg, task.quality_speed)
    step_sigmas = episode_sigmas(cfg)[:-1]  # the sigma each step's model call sees
    target = target_share(task.quality_speed, ready_share(cost, policy.layers, model.ready))
    teacher = trajectory(model, cfg, task.seed, None, policy.layers)
    out = []
    for k in range(cfg.rollouts):
        plan = draw_rollout_masks(
            policy, state, step_sigmas, model.ready, seed=mask_seed(cfg, task, k), floor=cfg.prob_floor
        )
        routed = trajectory(model, cfg, task.seed, plan, policy.layers)
        terms = quality_terms(
            routed.latent, teacher.latent, routed.image, teacher.image, perceptual_of(model, routed, teacher)
        )
        share = float(cost.routed_share(plan.full, policy.layers).mean())
        with torch.no_grad():
            logits = policy.logits([state.at(s) for s in step_sigmas])
        entropy = float(mean_entropy(logits, plan.eligible, floor=cfg.prob_floor))
        parts = reward(terms, share, entropy, cfg.reward, target=target, entropy_weight=cfg.entropy_weight)
        rollout = Rollout(task.group, k, state, plan.records(), terms, parts, float(plan.log_prob.sum()))
        out.append((rollout, routed))
    return teacher, out
