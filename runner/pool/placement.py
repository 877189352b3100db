"""What a pool asks the cluster for, whether the cluster has it, and waiting until it is placed.

A pool is planned from the job's `PoolConfig`, its model and the cluster's resources: how many
workers, where they run (GPU or CPU) and what each reserves. Workers are Ray actors that reserve
their CPUs and GPUs as actor resources, so a worker the cluster cannot place yet stays pending and
its request is what an autoscaler sees and acts on. The pool never decides from the cluster's
current GPUs that a model which needs a GPU runs on the CPU; the one designed CPU fallback (a model
that runs on a CPU, `pool.device: auto`, a cluster with no GPU) is returned as a note for job.json.

The fit check compares what the workers still to be created need with what is free
(`ray.available_resources()`): workers of a pool being reused already hold their share.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import ray

from core.models.loading import ModelSpec
from runner.config import JobConfigError, PoolConfig

EPS = 1e-9
LOG_EVERY_S = 10.0  # console lines while waiting for workers


class PoolError(JobConfigError):
    """The cluster cannot host the pool the job asks for (a config the cluster cannot run)."""


@dataclass(frozen=True)
class WorkerResources:
    """What one worker reserves and how it runs: Ray resources, torch threads, GPU memory cap."""

    cpus: float
    gpus: float
    gpu_memory_fraction: float = 1.0

    @property
    def device(self) -> str:
        return "gpu" if self.gpus > 0 else "cpu"

    @property
    def cpu_threads(self) -> int:
        return max(1, int(self.cpus))

    def demand(self) -> dict[str, float]:
        return {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}

    def describe(self) -> str:
        return ", ".join(amount(v, k) for k, v in self.demand().items())

    def as_dict(self) -> dict:
        return {"cpus": self.cpus, "gpus": self.gpus, "gpu_memory_fraction": self.gpu_memory_fraction}


@dataclass(frozen=True)
class PoolPlan:
    """The pool a job asks for: its name, how many workers, what each reserves, and why."""

    name: str
    size: int
    resources: WorkerResources
    fields: str  # the config fields that set the demand, for messages ("pool.workers=2 x ...")
    notes: tuple[str, ...] = ()  # decisions a user should see (a designed CPU fallback, a default size)
    cpu_fallback: bool = False


def needs_gpu(spec: ModelSpec) -> bool:
    """Flux.1 (12 B parameters) and random weights of its shape are not run on a CPU; the reference
    model and the tiny test model are."""
    return spec.kind == "flux" or (spec.kind == "random" and spec.shape == "flux-dev")


def plan_pool(cfg: PoolConfig, spec: ModelSpec, total: Mapping[str, float]) -> PoolPlan:
    """The workers to run for `cfg` and `spec` on a cluster whose total resources are `total`."""
    cluster_gpus = total.get("GPU", 0.0)
    gpu = cfg.device == "gpu" or (cfg.device == "auto" and (needs_gpu(spec) or cluster_gpus > 0))
    notes: list[str] = []
    cpu_fallback = False
    if cfg.device == "auto" and not gpu:
        cpu_fallback = True
        notes.append(f"model {model_name(spec)} runs on a CPU and the cluster has no GPU: CPU workers")
    if gpu:
        if cfg.workers:
            size = cfg.workers
        elif cluster_gpus > 0:
            size = max(1, math.floor(cluster_gpus / cfg.gpus_per_worker + EPS))
        else:
            size = 1
            notes.append(
                "pool.workers=0 and the cluster has no GPU now: asking for 1 GPU worker "
                "(set pool.workers to ask an autoscaler for more)"
            )
        resources = WorkerResources(cfg.cpus_per_worker, cfg.gpus_per_worker, cfg.gpu_memory_fraction)
        fields = f"pool.workers={size} x pool.gpus_per_worker={cfg.gpus_per_worker:g}"
    else:
        size = cfg.workers or 1
        resources = WorkerResources(cfg.cpus_per_worker, 0.0, cfg.gpu_memory_fraction)
        fields = f"pool.workers={size} x pool.cpus_per_worker={cfg.cpus_per_worker:g}"
    return PoolPlan(cfg.name, size, resources, fields, tuple(notes), cpu_fallback)


def model_name(spec: ModelSpec) -> str:
    if spec.kind == "random":
        return f"random/{spec.shape}"
    return f"{spec.kind}:{spec.path}" if spec.path else spec.kind


def spec_difference(asked: ModelSpec, served: ModelSpec) -> str:
    """ "model.seed=1 (served: 0)": the fields in which two specs differ (the whole spec is what a
    worker loads, its prompt included: the conditioning is made from it)."""
    fields = [f for f in asked.__dataclass_fields__ if getattr(asked, f) != getattr(served, f)]
    return ", ".join(f"model.{f}={getattr(asked, f)!r} (served: {getattr(served, f)!r})" for f in fields)


def total_demand(resources: WorkerResources, count: int) -> dict[str, float]:
    return {k: v * count for k, v in resources.demand().items()}


def shortfall(need: Mapping[str, float], free: Mapping[str, float]) -> dict[str, float]:
    """Resources of `need` that `free` lacks, by how much."""
    return {k: v - free.get(k, 0.0) for k, v in need.items() if v > free.get(k, 0.0) + EPS}


def amount(value: float, resource: str) -> str:
    """ "1 GPU", "0.5 GPU", "2 GPUs", "0 GPUs"."""
    return f"{value:g} {resource}" + ("s" if value == 0 or value > 1 else "")


def describe_need(need: Mapping[str, float], free: Mapping[str, float], total: Mapping[str, float]) -> str:
    """ "needs 4 GPUs; the cluster has 2 GPUs free (of 2 GPUs)", naming the resources that are short
    (all of `need` when none is)."""
    keys = list(shortfall(need, free)) or list(need)

    def amounts(res: Mapping[str, float]) -> str:
        return ", ".join(amount(res.get(k, 0.0), k) for k in keys)

    return f"needs {amounts(need)}; the cluster has {amounts(free)} free (of {amounts(total)})"


def cluster_line(resources: WorkerResources) -> str:
    """ "the cluster has 0 GPUs, 2 CPUs free (of 2 GPUs, 4 CPUs)", for the resources a worker needs."""
    free, total = ray.available_resources(), ray.cluster_resources()
    keys = list(resources.demand())
    return (
        f"the cluster has {', '.join(amount(free.get(k, 0.0), k) for k in keys)} free "
        f"(of {', '.join(amount(total.get(k, 0.0), k) for k in keys)})"
    )


def cluster_can_grow() -> bool:
    """False when this process started the Ray it is connected to (`tessera run` without a cluster):
    nothing adds nodes to it, so a pool that does not fit now never will. A joined cluster may
    autoscale. Ray exposes whether the driver started its node only on its Node object."""
    node = getattr(ray._private.worker.global_worker, "node", None)
    return not (node is not None and node.head)


def wait_placed(
    handles: Sequence,
    *,
    what: str,
    need_each: WorkerResources,
    timeout_s: float,
    log: Callable[[str], None],
) -> list[dict]:
    """Wait until every worker in `handles` has started (placed and constructed); their info() in
    order. Prints a line every LOG_EVERY_S seconds with what they need and what the cluster has
    free; PoolError after `timeout_s` (the caller stops the workers it made). Ray does not tell a
    worker waiting for resources from one starting its process, so the timeout covers both."""
    refs = [h.info.remote() for h in handles]
    start = time.monotonic()
    pending = list(refs)
    while pending:
        left = timeout_s - (time.monotonic() - start)
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=max(0.0, min(LOG_EVERY_S, left)))
        if not pending:
            break
        left = timeout_s - (time.monotonic() - start)
        waiting = f"{len(pending)} of {len(refs)} workers ({need_each.describe()} each)"
        if left <= 0:
            raise PoolError(
                f"{what}: {waiting} did not start within pool.placement_timeout_s={timeout_s:g} s; "
                f"{cluster_line(need_each)}"
            )
        log(f"{what}: waiting for {waiting} to start; {cluster_line(need_each)}; {left:.0f} s left")
    return ray.get(refs)
