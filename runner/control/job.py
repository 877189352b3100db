"""Running `task: controller`: rollout worker actors, the central learner actor, the task's loop.

Workers reserve one GPU each when the cluster has enough for all of them, else one CPU each; they
and the learner are this job's own actors and are killed when it ends (fails or is interrupted).
Groups go to whichever worker is free (`ray.wait`), results come back in task order, and a group
is a pure function of (model, students, weights, task), so the assignment never changes an update.

The reward's perceptual term (LPIPS-Alex, runner/perceptual.py): `check` runs before any work (the
registry's pre-flight check) and refuses a job with perceptual_weight > 0 whose AlexNet backbone is
missing or not the published file, naming the field and the path; the workers load LPIPS only when the
weight is > 0, and job.json records the weight used (`records.perceptual`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray

from core.control.episode import GroupTask
from core.control.learner import LearnerConfig
from core.control.policy import PolicyConfig
from core.control.reward import CostTable
from runner.config import Job
from runner.context import JobArtifacts
from runner.control.learner import RemoteLearner
from runner.control.worker import RolloutWorker
from runner.perceptual import ALEXNET_FILE, ALEXNET_SHA256, resolve_lpips
from tasks.controller_config import ControllerConfig, GroupResult, WorkerInfo


def lpips_backbone(cfg: ControllerConfig) -> str | None:
    """The configured AlexNet checkpoint, or None for the torch hub cache."""
    return cfg.lpips_backbone or None


def check(cfg: ControllerConfig) -> None:
    """Before any work: perceptual_weight > 0 needs verified LPIPS weights."""
    if cfg.perceptual_weight <= 0:
        return
    weights = resolve_lpips(lpips_backbone(cfg))
    if not weights.available:
        raise FileNotFoundError(
            f"perceptual_weight {cfg.perceptual_weight} needs LPIPS, which is unavailable: {weights.reason}. "
            f"Set lpips_backbone to torchvision's {ALEXNET_FILE} (SHA-256 {ALEXNET_SHA256}), or "
            "perceptual_weight=0"
        )


def perceptual_record(cfg: ControllerConfig) -> dict[str, Any]:
    """The perceptual term as used: its weight and where the LPIPS weights came from (or why not)."""
    weights = resolve_lpips(lpips_backbone(cfg))
    return {"weight": cfg.perceptual_weight, "lpips": weights.record()}


class ControllerJobContext:
    """tasks.controller_config.ControllerContext on a Ray cluster: artifacts plus the actors."""

    def __init__(self, arts: JobArtifacts) -> None:
        self.arts = arts
        self.workers: list[Any] = []
        self.learner: RemoteLearner | None = None
        self.groups_by_worker: dict[int, int] = {}

    def __getattr__(self, name: str) -> Any:  # artifacts: save_image, record, progress, ...
        return getattr(self.arts, name)

    def start_workers(self, cfg: ControllerConfig) -> list[WorkerInfo]:
        gpus = ray.cluster_resources().get("GPU", 0.0)
        options = {"num_gpus": 1, "num_cpus": 1} if gpus >= cfg.workers else {"num_cpus": 1}
        self.arts.record("controller_workers", {"count": cfg.workers, **options})
        self.arts.record("perceptual", perceptual_record(cfg))
        actor = ray.remote(RolloutWorker).options(**options)
        self.workers = [actor.remote(cfg, w) for w in range(cfg.workers)]
        self.policy_config: PolicyConfig | None = None
        return ray.get([w.info.remote() for w in self.workers])

    def start_learner(self, policy: PolicyConfig, cfg: LearnerConfig, *, seed: int) -> RemoteLearner:
        self.policy_config = policy
        self.learner = RemoteLearner(policy, cfg, seed=seed)
        return self.learner

    def run_groups(
        self, tasks: Sequence[GroupTask], weights: Any, cost: CostTable, *, images: bool
    ) -> list[GroupResult]:
        pending = list(enumerate(tasks))
        free = list(range(len(self.workers)))
        running: dict[ray.ObjectRef, tuple[int, int]] = {}
        results: dict[int, GroupResult] = {}
        while pending or running:
            while pending and free:
                i, task = pending.pop(0)
                w = free.pop(0)
                ref = self.workers[w].run_group.remote(task, self.policy_config, weights, cost, images)
                running[ref] = (i, w)
            done, _ = ray.wait(list(running), num_returns=1)
            i, w = running.pop(done[0])
            results[i] = ray.get(done[0])
            self.groups_by_worker[w] = self.groups_by_worker.get(w, 0) + 1
            free.append(w)
        return [results[i] for i in range(len(tasks))]

    def read_json(self, path: str) -> Any:
        return json.loads(Path(path).read_text())

    def close(self) -> None:
        for w in self.workers:
            ray.kill(w)
        if self.learner is not None:
            self.learner.close()


def run_controller_task(job: Job, arts: JobArtifacts) -> tuple[Any, dict]:
    ctx = ControllerJobContext(arts)
    try:
        result = job.task.run_fn()(job.config, ctx)
    finally:
        arts.record("groups_by_worker", {str(k): v for k, v in sorted(ctx.groups_by_worker.items())})
        ctx.close()
    print(f"[controller] {result['updates']} updates", file=arts.stream or sys.stdout, flush=True)
    return result, {}
