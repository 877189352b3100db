"""Seeing and stopping pools: `tessera pool list | stop NAME | stop --all`.

A pool is the set of live actors named "<pool>-<i>" in the "tessera" namespace that answer
`describe()` (model workers); its state is theirs: the model each serves, what each reserves, the
jobs using it, its idle time and idle timeout. A worker that does not answer within a few seconds
is listed as pending (not placed yet, or busy past the wait).

Stopping a pool that an active job uses is refused unless forced: the job would lose its workers
and replace them (runner/pool/job_workers.py), bringing the pool back. A job counts as active until
it ends or has not called the pool for the pool's idle timeout.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import ray

NAMESPACE = "tessera"
WORKER_NAME = re.compile(r"^(?P<pool>[A-Za-z0-9_-]+)-(?P<index>\d+)$")
ANSWER_S = 5.0  # how long `list` waits for a worker's answer
STOP_WAIT_S = 30.0  # how long `stop` waits for the workers' names to be released


class PoolInUseError(RuntimeError):
    """A pool has active jobs and the stop was not forced."""


@dataclass(frozen=True)
class WorkerState:
    name: str
    index: int
    placed: bool
    model: str | None = None
    resources: dict | None = None
    active_jobs: dict[str, float] = field(default_factory=dict)
    idle_s: float | None = None
    idle_timeout_s: float | None = None
    node: str | None = None
    pid: int | None = None


@dataclass(frozen=True)
class PoolState:
    name: str
    workers: tuple[WorkerState, ...]

    @property
    def active_jobs(self) -> dict[str, float]:
        return {j: a for w in self.workers for j, a in w.active_jobs.items()}

    @property
    def idle_s(self) -> float | None:
        """The pool has been idle as long as its least idle worker."""
        idles = [w.idle_s for w in self.workers if w.idle_s is not None]
        return min(idles) if idles else None

    def row(self) -> dict[str, str]:
        placed = [w for w in self.workers if w.placed]
        models = sorted({w.model or "none" for w in placed}) or ["?"]
        per_worker = sorted({_resources(w.resources) for w in placed}) or ["?"]
        timeouts = sorted({f"{w.idle_timeout_s:g} s" for w in placed if w.idle_timeout_s is not None})
        idle = self.idle_s
        return {
            "pool": self.name,
            "workers": f"{len(placed)}/{len(self.workers)}",
            "model": ",".join(models),
            "per worker": ";".join(per_worker),
            "jobs": str(len(self.active_jobs)),
            "idle": "-" if idle is None else f"{idle:.0f} s",
            "idle timeout": ",".join(timeouts) or "-",
        }


def _resources(res: dict | None) -> str:
    if not res:
        return "?"
    gpus = f", {res['gpus']:g} GPU" if res.get("gpus") else ""
    return f"{res['cpus']:g} CPU{gpus}"


def worker_names() -> dict[str, list[tuple[int, str]]]:
    """Pool name -> [(index, actor name)] of the live named actors that look like pool workers."""
    pools: dict[str, list[tuple[int, str]]] = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] != NAMESPACE:
            continue
        match = WORKER_NAME.match(entry["name"])
        if match:
            pools.setdefault(match["pool"], []).append((int(match["index"]), entry["name"]))
    return {name: sorted(ws) for name, ws in pools.items()}


def pool_workers(names: list[tuple[int, str]]) -> dict[tuple[int, str], object]:
    """Handles of the model workers among `names` (other named actors of the namespace are not
    pools, e.g. a node's replay store "replay-<node id>")."""
    handles = {}
    for index, name in names:
        try:
            handle = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:  # ended since it was listed
            continue
        if hasattr(handle, "describe"):
            handles[(index, name)] = handle
    return handles


def list_pools() -> list[PoolState]:
    """Every pool on the cluster, with its workers' states."""
    out = []
    for pool, names in sorted(worker_names().items()):
        handles = pool_workers(names)
        if not handles:
            continue
        refs = {key: h.describe.remote() for key, h in handles.items()}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=ANSWER_S)
        workers = []
        for (index, name), ref in refs.items():
            if ref not in ready:
                workers.append(WorkerState(name, index, placed=False))
                continue
            d = ray.get(ref)
            workers.append(
                WorkerState(
                    name,
                    index,
                    True,
                    d["model_name"],
                    d["resources"],
                    d["active_jobs"],
                    d["idle_s"],
                    d["idle_timeout_s"],
                    d.get("node"),
                    d.get("pid"),
                )
            )
        out.append(PoolState(pool, tuple(workers)))
    return out


def stop_pool(name: str, *, force: bool = False) -> int:
    """Stop every worker of pool `name`; returns how many. Refused (PoolInUseError) while a job uses
    it, unless `force`. KeyError when there is no such pool."""
    pools = {p.name: p for p in list_pools()}
    if name not in pools:
        known = ", ".join(sorted(pools)) or "none"
        raise KeyError(f"no pool named {name!r} on this cluster (pools: {known})")
    pool = pools[name]
    if pool.active_jobs and not force:
        jobs = ", ".join(f"{j} (last call {a:.0f} s ago)" for j, a in sorted(pool.active_jobs.items()))
        raise PoolInUseError(
            f"pool {name!r} is in use by job(s) {jobs}; stop those jobs first, or --force "
            "(a job that is still running replaces the workers it loses)"
        )
    return stop_workers(name)


def stop_all(*, force: bool = False) -> tuple[dict[str, int], dict[str, str]]:
    """Stop every pool; (workers stopped by pool, refusals by pool)."""
    stopped, refused = {}, {}
    for pool in list_pools():
        try:
            stopped[pool.name] = stop_pool(pool.name, force=force)
        except PoolInUseError as err:
            refused[pool.name] = str(err)
    return stopped, refused


def stop_workers(name: str) -> int:
    """Kill every worker of pool `name` (no restart) and wait until their names are released, so a
    pool of the same name can be created at once."""
    handles = pool_workers(worker_names().get(name, []))
    for handle in handles.values():
        ray.kill(handle, no_restart=True)
    stopping = {n for _, n in handles}
    deadline = time.monotonic() + STOP_WAIT_S
    while time.monotonic() < deadline and stopping & {n for _, n in worker_names().get(name, [])}:
        time.sleep(0.1)
    return len(handles)
