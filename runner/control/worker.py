"""A rollout worker: the model, the servable students and the cost table, loaded and measured once.

`RolloutWorker` is a plain class (tests use it in-process); the job runs it as a Ray actor, one per
worker. `run_group` receives the learner's current weights (one object shared by every worker)
and returns the group's rollouts (core/control/episode.py).
"""

from __future__ import annotations

import torch

from core.control.episode import EpisodeConfig, EpisodeModel, GroupTask, run_group
from core.control.policy import PolicyConfig, build_policy
from core.control.reward import CostTable
from core.models.attention_hook import layer_keys
from runner.control.timing import measure_cost_table
from runner.distill.bundle import load_bundle
from runner.models import load_model, model_device
from runner.perceptual import require_lpips
from tasks.controller_config import ControllerConfig, GroupResult, WorkerInfo


class RolloutWorker:
    def __init__(self, cfg: ControllerConfig, worker: int, *, threads: int = 1) -> None:
        torch.set_num_threads(threads)  # the same on every worker, so groups do not depend on placement
        self.worker = worker
        device = model_device()
        loaded = load_model(cfg.model, device)
        bundle = load_bundle(cfg.students)
        self.layers = tuple(layer_keys(loaded.backbone.transformer))
        unknown = sorted(set(bundle.layers) - set(self.layers))
        if unknown:
            raise ValueError(
                f"students {cfg.students!r} has layers {unknown} that the model lacks ({self.layers})"
            )
        servable = [k for k in self.layers if k in bundle.layers and bundle.layers[k].may_serve]
        students = {k: bundle.layers[k].build(device) for k in servable}
        latent = cfg.size // loaded.vae.scale_factor
        dtype = next(loaded.backbone.parameters()).dtype
        # LPIPS only when the reward weighs it; the job's pre-flight check has verified the weights
        perceptual = (
            require_lpips(cfg.lpips_backbone or None, device=device) if cfg.perceptual_weight > 0 else None
        )
        self.model = EpisodeModel(
            loaded.backbone, loaded.vae.decode, loaded.make_cond().to(device, dtype), students, perceptual
        )
        self.episode = EpisodeConfig(
            latent_h=latent,
            latent_w=latent,
            steps=cfg.steps,
            rollouts=cfg.rollouts,
            job_seed=cfg.seed,
            prob_floor=cfg.prob_floor,
            entropy_weight=cfg.entropy_weight,
            reward=cfg.reward(),
        )
        self.cost = measure_cost_table(
            loaded.backbone,
            self.model.cond,
            students,
            latent_h=latent,
            latent_w=latent,
            repeats=cfg.timing_repeats,
        )
        self.device = str(device)
        self._policy = None

    def info(self) -> WorkerInfo:
        return WorkerInfo(self.worker, self.layers, tuple(self.model.students), self.cost, self.device)

    def run_group(
        self, task: GroupTask, policy_config: PolicyConfig, weights: dict, cost: CostTable, images: bool
    ) -> GroupResult:
        if self._policy is None or self._policy.config != policy_config:
            self._policy = build_policy(policy_config, seed=0)
        self._policy.load_state_dict(weights)
        teacher, rollouts = run_group(self.model, self._policy, cost, self.episode, task)
        return GroupResult(
            task,
            tuple(r for r, _ in rollouts),
            teacher.image if images else None,
            rollouts[0][1].image if images else None,
            self.worker,
        )
