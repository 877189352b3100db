"""A named pool of model workers: found or created by name, so models stay loaded across jobs.

Workers are detached actors named "<pool>-<i>" in the "tessera" namespace; they outlive the job
that made them, and the next job with the same pool name reuses them with their model loaded. They
end with the cluster, with `tessera pool stop` (runner/pool/lifecycle.py), or on their own once no
job has called them for `pool.idle_timeout_s`.

`connect_pool` plans the pool (runner/pool/placement.py), then for each worker of the plan:

- reuses the worker of that name when it reserves what the job asks for; a pool whose workers
  reserve something else is recreated when no job is using it and refused (PoolError) when one is;
- creates the missing ones; creation is idempotent under a race (`get_if_exists`: two jobs creating
  the same pool get the same actors; each worker records the token of the call that created it);
- waits until all are placed, with a line every few seconds naming what is missing, up to
  `pool.placement_timeout_s` (at once on a local Ray this process started: it cannot grow);
- joins the job to every worker with its ModelSpec: a worker serving another model to an active job
  refuses (PoolError); an idle one reloads.

What happened (created, reused, extended, recreated, reloaded, and why) is printed and kept in
`WorkerPool.facts` for job.json.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import ray
from ray.exceptions import ActorDiedError

from core.models.loading import ModelSpec
from runner.config import PoolConfig
from runner.pool.lifecycle import stop_workers
from runner.pool.placement import (
    PoolError,
    PoolPlan,
    WorkerResources,
    amount,
    cluster_can_grow,
    describe_need,
    model_name,
    plan_pool,
    shortfall,
    spec_difference,
    total_demand,
    wait_placed,
)
from runner.pool.worker import ModelWorker, PoolBusyError, WorkerIdentity

NAMESPACE = "tessera"
__all__ = ["NAMESPACE", "PoolError", "WorkerPool", "connect_pool", "create_worker", "shutdown_pool"]


def console(line: str) -> None:
    print(line, flush=True)


@dataclass
class WorkerPool:
    """A job's connection to a pool: handles and infos of its workers, and how the pool was made."""

    name: str
    workers: list  # ActorHandles, worker i at index i
    infos: list[dict]
    created: int  # how many workers this call created (the rest were reused)
    plan: PoolPlan | None = None
    spec: ModelSpec | None = None
    job: str = ""  # the job connect_pool joined to the workers
    worker_cls: type = ModelWorker
    idle_timeout_s: float = 0.0
    facts: dict = field(default_factory=dict)  # action, reason, resources: the pool part of job.json

    @property
    def size(self) -> int:
        return len(self.workers)


def worker_name(pool: str, index: int) -> str:
    return f"{pool}-{index}"


def find_worker(pool: str, index: int):
    """The live (or pending) actor of that name, or None."""
    try:
        return ray.get_actor(worker_name(pool, index), namespace=NAMESPACE)
    except ValueError:
        return None


def create_worker(
    plan: PoolPlan, index: int, worker_cls: type, *, token: str, idle_timeout_s: float
) -> ray.actor.ActorHandle:
    """Worker `index` of the plan, or the live one of that name if another caller made it first.

    max_restarts=0: a lost worker is replaced by the job that lost it (runner/pool/job_workers.py),
    which reloads it and gives it the job's state before sending work; Ray never re-runs a call that
    crashed a worker (max_task_retries=0), so one poison input cannot burn the pool (docs/runner.md).
    """
    res = plan.resources
    identity = WorkerIdentity(plan.name, res, token, idle_timeout_s)
    actor = ray.remote(concurrency_groups={"control": 1})(worker_cls)
    return actor.options(
        name=worker_name(plan.name, index),
        namespace=NAMESPACE,
        get_if_exists=True,
        num_cpus=res.cpus,
        num_gpus=res.gpus,
        max_restarts=0,
        max_task_retries=0,
        lifetime="detached",
        max_concurrency=2,  # see runner/pool/worker.py: transport overlaps the device work
    ).remote(index, res.cpu_threads, res.gpu_memory_fraction, identity=identity)


def connect_pool(
    cfg: PoolConfig,
    spec: ModelSpec,
    *,
    worker_cls: type = ModelWorker,
    job: str | None = None,
    log: Callable[[str], None] = console,
) -> WorkerPool:
    """Find or create the pool's workers, join `job` (a new id if None) to them with `spec` loaded.

    worker_cls: the actor class of workers this call creates (a ModelWorker; benchmarks pass a
    subclass that simulates devices, tests one that injects faults).
    """
    job = job or uuid.uuid4().hex[:12]
    plan = plan_pool(cfg, spec, ray.cluster_resources())
    what = f"pool '{cfg.name}'"
    for note in plan.notes:
        log(f"{what}: {note}")
    try:
        return _connect(cfg, spec, plan, job, worker_cls, what, log)
    except ActorDiedError as err:  # a worker found by name ended meanwhile (its idle timeout): again
        log(f"{what}: a worker ended while connecting ({type(err).__name__}); connecting again")
        return _connect(cfg, spec, plan, job, worker_cls, what, log)


def _connect(cfg, spec, plan: PoolPlan, job: str, worker_cls: type, what: str, log) -> WorkerPool:
    existing, facts, freed = _reuse(cfg, plan, what, log)
    handles, infos, created = _create_missing(cfg, plan, existing, freed, worker_cls, what, log)
    try:
        joined = ray.get([h.join.remote(job, spec, cfg.idle_timeout_s) for h in handles])
    except PoolBusyError as err:  # raised in the worker: Ray's error is also the worker's type
        raise PoolError(
            f"{what}: {err.cause}; a pool serves one model at a time: run this job on another pool "
            "(pool.name=...) or after those jobs end"
        ) from None
    reloaded = sorted(
        {
            spec_difference(spec, ModelSpec(**i["model"]))
            for i in infos
            if i["model"] not in (None, spec.__dict__)
        }
    )
    facts.update(_action(plan, created, reloaded, facts.get("action")))
    facts.update(
        per_worker=plan.resources.as_dict(),
        device=plan.resources.device,
        model=model_name(spec),
        idle_timeout_s=cfg.idle_timeout_s,
        placement_timeout_s=cfg.placement_timeout_s,
        notes=list(plan.notes),
        cpu_fallback=plan.cpu_fallback,
    )
    log(
        f"{what}: {facts['action']} ({amount(plan.size, 'worker')}, {plan.resources.describe()} each, "
        f"model {model_name(spec)}{'; ' + facts['reason'] if facts.get('reason') else ''})"
    )
    return WorkerPool(
        cfg.name, handles, joined, created, plan, spec, job, worker_cls, cfg.idle_timeout_s, facts
    )


def _reuse(cfg: PoolConfig, plan: PoolPlan, what: str, log) -> tuple[dict[int, object], dict, dict]:
    """The pool's existing workers that the plan can reuse, facts, and the resources released; a
    pool whose workers reserve something else is stopped (no active job) or refused (PoolError)."""
    found = {i: h for i in range(plan.size) if (h := find_worker(cfg.name, i)) is not None}
    if not found:
        return {}, {}, {}
    infos = wait_placed(
        list(found.values()),
        what=what,
        need_each=plan.resources,
        timeout_s=cfg.placement_timeout_s,
        log=log,
    )
    want = plan.resources.as_dict()
    wrong = [info for info in infos if info.get("resources") != want]
    if not wrong:
        return found, {}, {}
    had = WorkerResources(**wrong[0]["resources"]).describe() if wrong[0].get("resources") else "unknown"
    busy = {j: age for info in infos for j, age in info["active_jobs"].items()}
    reason = f"its workers reserve {had} each, this job asks for {plan.resources.describe()}"
    if busy:
        raise PoolError(
            f"{what}: {reason}, and job(s) {', '.join(sorted(busy))} are using it: run this job on "
            "another pool (pool.name=...) or after they end"
        )
    log(f"{what}: recreating: {reason}")
    stop_workers(cfg.name)
    freed: dict[str, float] = {}
    for info in infos:
        held = WorkerResources(**info["resources"]).demand() if info.get("resources") else {}
        for k, v in held.items():
            freed[k] = freed.get(k, 0.0) + v
    return {}, {"action": "recreated", "reason": reason}, freed


def _create_missing(cfg, plan: PoolPlan, existing: dict, freed: dict, worker_cls, what: str, log):
    """Create the plan's missing workers (checking they fit first) and wait until all are placed."""
    missing = [i for i in range(plan.size) if i not in existing]
    if missing:
        _check_fit(plan, len(missing), freed, what)
    token = uuid.uuid4().hex
    handles = [
        existing[i]
        if i in existing
        else create_worker(plan, i, worker_cls, token=token, idle_timeout_s=cfg.idle_timeout_s)
        for i in range(plan.size)
    ]
    try:
        infos = wait_placed(
            handles, what=what, need_each=plan.resources, timeout_s=cfg.placement_timeout_s, log=log
        )
    except (PoolError, ActorDiedError):
        for i in missing:  # not placed: stop them, or they hold the resources (and an autoscaler's
            ray.kill(handles[i])  # request) after this job has given up
        raise
    created = sum(1 for i in missing if infos[i]["token"] == token)
    return handles, infos, created


def _check_fit(plan: PoolPlan, count: int, freed: dict, what: str) -> None:
    """Fail now when `count` new workers do not fit in the free resources of a cluster that cannot
    grow. `freed`: what workers stopped just now held (their release may not show yet)."""
    total = ray.cluster_resources()
    available = ray.available_resources()
    free = {k: min(total.get(k, 0.0), available.get(k, 0.0) + freed.get(k, 0.0)) for k in total}
    need = total_demand(plan.resources, count)
    if shortfall(need, free) and not cluster_can_grow():
        raise PoolError(f"{what}: {plan.fields} {describe_need(need, free, total)}")


def _action(plan: PoolPlan, created: int, reloaded: list[str], earlier: str | None) -> dict:
    reused = plan.size - created
    if earlier == "recreated":
        action = "recreated"
    elif created == plan.size:
        action = "created"
    elif created:
        action = "extended"
    else:
        action = "reused"
    out = {"action": action, "created": created, "reused": reused}
    if reloaded:
        out["reloaded_from"] = reloaded
        out["action"] = f"{action}, model reloaded"
    return out


def shutdown_pool(pool: WorkerPool) -> None:
    for handle in pool.workers:
        ray.kill(handle)
