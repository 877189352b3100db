"""A named pool of model workers: found or created by name, so models stay loaded across jobs.

Workers are actors named "<pool>-<i>" in the "tessera" namespace. Each reserves
`gpus_per_worker` GPUs, so Ray places one worker per GPU; on a CPU-only cluster the pool has
one worker unless the job asks for more. Workers are detached: they outlive the job, and the next
job with the same pool name reuses them with their model loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ray

from core.models.loading import ModelSpec
from runner.config import PoolConfig
from runner.pool.worker import ModelWorker

NAMESPACE = "tessera"


class PoolError(RuntimeError):
    """The cluster cannot host the pool the job asks for."""


@dataclass
class WorkerPool:
    name: str
    workers: list  # ActorHandles
    infos: list[dict]
    created: int  # how many workers this call created (the rest were reused)

    @property
    def size(self) -> int:
        return len(self.workers)


def pool_size(cfg: PoolConfig, cluster_gpus: float) -> int:
    """Workers to run: cfg.workers, or one per GPU (per gpus_per_worker), or 1 without GPUs."""
    if cfg.workers:
        return cfg.workers
    if cluster_gpus <= 0:
        return 1
    return max(1, math.floor(cluster_gpus / cfg.gpus_per_worker + 1e-9))


def connect_pool(cfg: PoolConfig, spec: ModelSpec, *, worker_cls: type = ModelWorker) -> WorkerPool:
    """Find or create the pool's workers, load `spec` on each (in parallel), return their infos.

    Workers are detached actors: they outlive the handles of the job that made them (so the next job
    of this driver, or of any driver on a long-lived cluster, finds them loaded) and end with the
    cluster or `shutdown_pool`. A local Ray started by `tessera run` ends with the run.
    worker_cls: the actor class (a ModelWorker; benchmarks pass a subclass that simulates devices).
    """
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0.0)
    cpus = resources.get("CPU", 0.0)
    n = pool_size(cfg, gpus)
    use_gpus = gpus > 0
    if use_gpus and n * cfg.gpus_per_worker > gpus + 1e-9:
        raise PoolError(
            f"pool.workers={n} x pool.gpus_per_worker={cfg.gpus_per_worker} needs "
            f"{n * cfg.gpus_per_worker:g} GPUs; the cluster has {gpus:g}"
        )
    if not use_gpus and n * cfg.cpus_per_worker > cpus + 1e-9:
        raise PoolError(
            f"pool.workers={n} x pool.cpus_per_worker={cfg.cpus_per_worker} needs "
            f"{n * cfg.cpus_per_worker:g} CPUs; the cluster has {cpus:g}"
        )
    handles, created = [], 0
    for i in range(n):
        actor_name = f"{cfg.name}-{i}"
        try:
            handle = ray.get_actor(actor_name, namespace=NAMESPACE)
        except ValueError:
            options = dict(
                name=actor_name,
                namespace=NAMESPACE,
                num_cpus=cfg.cpus_per_worker,
                num_gpus=cfg.gpus_per_worker if use_gpus else 0,
                max_restarts=1,
                # A call that crashes its worker is re-queued by the dispatcher, never retried blind.
                max_task_retries=0,
                lifetime="detached",
                max_concurrency=2,  # see runner/pool/worker.py: transport overlaps the device work
            )
            handle = (
                ray.remote(worker_cls)
                .options(**options)
                .remote(
                    i,
                    cpu_threads=max(1, int(cfg.cpus_per_worker)),
                    gpu_memory_fraction=cfg.gpu_memory_fraction,
                )
            )
            created += 1
        handles.append(handle)
    infos = ray.get([h.load.remote(spec) for h in handles])
    return WorkerPool(cfg.name, handles, infos, created)


def shutdown_pool(pool: WorkerPool) -> None:
    for handle in pool.workers:
        ray.kill(handle)
