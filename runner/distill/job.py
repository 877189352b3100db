"""The runner's side of `task: distill`: the pool's workers as distillation workers, one replay
store per node, teacher runs placed on the workers that own their layer groups, and recovery from a
lost worker by restarting the chunk from the last checkpoint.

- Workers: the job's pool (runner/pool/pool.py); each holds a `DistillSession` for the layer
  groups it owns (group g -> worker g mod W; runner/distill/session.py), so the teacher's weights are
  loaded once per worker and a layer's captures stay on its worker's node.
- Stores: `connect_store` on every node that runs a worker, with the job's budgets; the RAM tier
  under replay.ram_dir/<job folder's name>, the disk tier in the output folder (or replay.disk_dir).
  The sample-to-insert limiter is opened wide: the job's schedule (updates per capture) already fixes
  the ratio, and a limiter that binds would make training wait on arrival order.
- Runs: in run order, at most one in flight per worker (a worker's runs stay in order), workers in
  parallel. A run whose worker dies: the worker is replaced (runner/pool/job_workers.py), the runs
  in flight on the others finish, every store is put back to the chunk's starting state, every
  session restarts from the chunk's layer states, and the chunk runs again; recorded in job.json.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ray

from core.distill.plan import TeacherRun
from core.distill.ratio_limiter import RatioLimiterConfig
from core.distill.replay_policy import ReplayPolicyConfig
from core.flow.seeds import derive_seed
from runner.config import Job
from runner.context import JobArtifacts
from runner.distill.bundle import LayerEntry, StudentsBundle, save_bundle
from runner.pool.job_workers import LOST, JobWorkers
from runner.pool.pool import connect_pool
from runner.pool.worker import JobNotReadyError
from runner.replay import ReplayConfig, connect_store, shutdown_store
from tasks.distill_config import DistillConfig
from tasks.distill_records import LayerInfo, LayerSnapshot, RunReport

WIDE_OPEN = 1e15  # the limiter's error buffer: never binds (module docstring)
MAX_CHUNK_RESTARTS = 4


def run_distill(job: Job, arts: JobArtifacts) -> tuple[Any, dict]:
    """Run `task: distill` on the job's pool; (the task's state, the pool part of job.json)."""
    from tasks.distill import run

    with arts.timer("pool_connect"):
        pool = connect_pool(job.runner.pool, job.config.model)
    ctx = DistillJob(pool, job, arts)
    finished = False
    try:
        result = run(job.config, ctx)
        finished = True
        return result, ctx.summary()
    finally:
        ctx.close(delete_captures=finished)


class DistillJob:
    """tasks.distill_context.DistillContext on a Ray pool."""

    def __init__(self, pool, job: Job, arts: JobArtifacts) -> None:
        self.pool, self.job, self.arts = pool, job, arts
        self.workers_ = JobWorkers.of(
            pool, pool.job, placement_timeout_s=job.runner.pool.placement_timeout_s, log=self.status
        )
        self.workers = pool.size
        self.cfg: DistillConfig | None = None
        self.groups: dict[int, tuple[str, ...]] = {}
        self.stores: dict[str, Any] = {}  # node id -> store actor
        self.replay_cfg: ReplayConfig | None = None
        self.restarts: list[dict] = []
        self.busy_s: dict[int, float] = {}

    # -- the job's shape -------------------------------------------------------------------------
    def layers(self) -> list[LayerInfo]:
        return self.workers_.call("distill_layers", self.pool.job)

    def _owner(self, group: int) -> int:
        return group % self.workers

    def _groups_of(self, worker: int) -> dict[int, tuple[str, ...]]:
        return {g: keys for g, keys in self.groups.items() if self._owner(g) == worker}

    # -- stores and sessions ---------------------------------------------------------------------
    def begin(self, cfg, groups, states, replay) -> dict[str, Any]:
        self.cfg, self.groups = cfg, {int(g): tuple(k) for g, k in groups.items()}
        self.replay_cfg = self._replay_config(cfg)
        nodes = sorted({info["node_id"] for info in self.workers_.infos()})
        saved = list((replay or {}).get("nodes", []))
        for i, node in enumerate(nodes):
            self.stores[node] = connect_store(
                self.replay_cfg, node, state=saved[i] if i < len(saved) else None
            )
        self._start_sessions(states)
        return self.replay_state()

    def _replay_config(self, cfg: DistillConfig) -> ReplayConfig:
        budgets = cfg.replay
        output = self.arts.output.resolve()
        spi = float(cfg.training.updates_per_capture * cfg.training.trainer.captures_per_update)
        policy = ReplayPolicyConfig(
            ram_bytes=budgets.ram_mib << 20,
            disk_bytes=budgets.disk_mib << 20,
            limiter=RatioLimiterConfig(samples_per_insert=spi, min_size=1, error_buffer=WIDE_OPEN),
            validation_fraction=cfg.capture.validation_fraction,
            seed=derive_seed(cfg.seed, "replay"),
        )
        return ReplayConfig(
            ram_dir=str(Path(budgets.ram_dir) / f"{output.name}-{derive_seed(0, str(output)) % 10**8:08d}"),
            disk_dir=budgets.disk_dir or str(output / "replay"),
            policy=policy,
        )

    def _start_sessions(self, states: Mapping[str, Any]) -> None:
        refs = []
        for slot in self.workers_.slots:
            mine = self._groups_of(slot.index)
            layer_states = {k: states.get(k) for keys in mine.values() for k in keys}
            refs.append(slot.handle.distill_start.remote(self.pool.job, self.cfg, mine, layer_states))
        ray.get(refs)

    def replay_state(self) -> dict[str, Any]:
        return {"nodes": [ray.get(self.stores[n].state_dict.remote()) for n in sorted(self.stores)]}

    def _restore(self, states: Mapping[str, Any], replay: Mapping[str, Any]) -> None:
        saved = list(replay["nodes"])
        for i, node in enumerate(sorted(self.stores)):
            ray.get(self.stores[node].load_state_dict.remote(saved[i]))
        self._start_sessions(states)

    # -- runs ------------------------------------------------------------------------------------
    def teacher_runs(self, runs: Sequence[TeacherRun], *, states, replay) -> list[RunReport]:
        for attempt in range(MAX_CHUNK_RESTARTS + 1):
            lost = self._try_chunk(runs)
            if lost is None:
                return self._reports
            if attempt == MAX_CHUNK_RESTARTS:
                raise RuntimeError(f"runs {runs[0].index}-{runs[-1].index} lost a worker {attempt + 1} times")
            self._recover(lost, runs, states, replay)
        raise AssertionError("unreachable")

    def _try_chunk(self, runs: Sequence[TeacherRun]) -> tuple[int, BaseException] | None:
        """Run the chunk; None when done (reports in self._reports), else (worker, error) of a loss."""
        self._reports: list[RunReport] = []
        done: dict[int, RunReport] = {}
        pending = deque(runs)
        in_flight: dict[Any, tuple[TeacherRun, int, Any, float]] = {}
        while pending or in_flight:
            self._submit(pending, in_flight)
            refs = [*in_flight, *self.workers_.pending_refs()]
            ready, _ = ray.wait(refs, num_returns=1)
            for ref in ready:
                if ref not in in_flight:
                    self.workers_.settle(ref)
                    continue
                run, worker, handle, started = in_flight.pop(ref)
                try:
                    report: RunReport = ray.get(ref)
                except (*LOST, JobNotReadyError) as err:
                    self.workers_.lost(worker, handle, err)
                    self._drain(in_flight)
                    return worker, err
                self.busy_s[worker] = self.busy_s.get(worker, 0.0) + time.perf_counter() - started
                done[run.index] = report
        self._reports = [done[r.index] for r in runs]
        return None

    def _submit(self, pending: deque, in_flight: dict) -> None:
        """Give each free, ready worker its next run, keeping every worker's runs in order."""
        busy = {worker for _, worker, _, _ in in_flight.values()}
        ready = set(self.workers_.ready())
        for run in list(pending):
            worker = self._owner(run.group)
            if worker in busy:
                continue
            busy.add(worker)  # later runs of this worker wait for this one
            if worker not in ready:
                continue
            handle = self.workers_.handle(worker)
            ref = handle.distill_run.remote(self.pool.job, run)
            in_flight[ref] = (run, worker, handle, time.perf_counter())
            pending.remove(run)
        if not in_flight and pending:
            self.workers_.wait_ready()

    def _drain(self, in_flight: dict) -> None:
        """Let the other runs in flight end (their results are dropped: the chunk runs again)."""
        if in_flight:
            ray.wait(list(in_flight), num_returns=len(in_flight))
        for ref, (_, worker, handle, _) in list(in_flight.items()):
            try:
                ray.get(ref)
            except (*LOST, JobNotReadyError) as err:
                self.workers_.lost(worker, handle, err)
        in_flight.clear()

    def _recover(self, lost: tuple[int, BaseException], runs, states, replay) -> None:
        worker, err = lost
        start = time.perf_counter()
        while not all(s.ready for s in self.workers_.slots):
            self.workers_.wait_ready()
            self.workers_.poll()
            pending = self.workers_.pending_refs()
            if pending:
                done, _ = ray.wait(pending, num_returns=1, timeout=1.0)
                for ref in done:
                    self.workers_.settle(ref)
        self._restore(states, replay)
        entry = {
            "what": "distill chunk restarted",
            "worker": worker,
            "runs": [runs[0].index, runs[-1].index],
            "reason": f"worker {worker} was lost ({type(err).__name__}) during runs {runs[0].index}-"
            f"{runs[-1].index}; its replacement and every other worker restarted them from the last "
            f"checkpoint after {time.perf_counter() - start:.1f} s",
        }
        self.restarts.append(entry)
        self.arts.record_fallback(entry["what"], entry["reason"])

    # -- outputs ---------------------------------------------------------------------------------
    def save_students(self, name: str, layers: Sequence[LayerSnapshot], *, hyperparameters, assignment, meta):
        entries = {
            s.key: LayerEntry(
                key=s.key,
                student=s.student,
                weights={k: v for k, v in s.weights.items() if k != "_extra_state"},
                ready=s.ready,
                may_serve=s.may_serve,
                readiness=s.readiness,
                losses={k: v for k, v in s.losses.items() if v is not None},
                updates=s.updates,
                group=s.group,
                worker=s.worker,
            )
            for s in layers
        }
        bundle = StudentsBundle(
            layers=entries,
            hyperparameters=dict(hyperparameters),
            assignment=dict(assignment),
            meta=dict(meta),
        )
        save_bundle(self.arts.path(name), bundle)
        return name

    def status(self, line: str) -> None:
        print(line, file=self.arts.stream or sys.stdout, flush=True)

    def summary(self) -> dict:
        return {
            "workers": self.workers_.infos(),
            "pool": {"name": self.pool.name, "size": self.pool.size, **self.pool.facts},
            "worker_busy_s": {str(k): round(v, 3) for k, v in sorted(self.busy_s.items())},
            "worker_memory": self.workers_.call_ready("memory", replace=False),
            "replay": {"config": self.replay_cfg, "stats": self._store_stats()},
            "chunk_restarts": self.restarts,
            "fallbacks": self.workers_.fallbacks,
        }

    def _store_stats(self) -> list:
        out = []
        for node in sorted(self.stores):
            try:
                out.append(ray.get(self.stores[node].stats.remote()))
            except LOST:
                out.append({"node": node, "lost": True})
        return out

    def close(self, *, delete_captures: bool) -> None:
        """End the job on the workers and stop the stores, so the next job starts a store with its own
        config. The captures are deleted when the job finished (nothing resumes from them) and kept
        otherwise: a resubmitted job with the same output resumes from them."""
        self.workers_.end()
        for handle in self.stores.values():
            try:
                shutdown_store(handle, delete_files=delete_captures)
            except LOST:
                self.status("[distill] a replay store was already gone at the end of the job")

    # -- Artifacts: the job's files, record and metrics ------------------------------------------
    def read_image(self, path):
        return self.arts.read_image(path)

    def directory(self, name):
        return self.arts.directory(name)

    def save_image(self, name, image):
        return self.arts.save_image(name, image)

    def save_json(self, name, data):
        return self.arts.save_json(name, data)

    def save_tensors(self, name, tensors):
        return self.arts.save_tensors(name, tensors)

    def load_tensors(self, name):
        return self.arts.load_tensors(name)

    def save_state(self, name, state):
        return self.arts.save_state(name, state)

    def load_state(self, name):
        return self.arts.load_state(name)

    def log_metrics(self, metrics, *, step):
        self.arts.log_metrics(metrics, step=step)

    def progress(self, label, done, total, *, unit="views", count=None):
        self.arts.progress(label, done, total, unit=unit, count=count)

    def record(self, key, value):
        self.arts.record(key, value)

    def record_fallback(self, what, reason):
        self.arts.record_fallback(what, reason)

    def timer(self, name):
        return self.arts.timer(name)
