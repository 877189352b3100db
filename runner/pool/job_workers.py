"""A job's hold on its pool's workers: which are ready, and the replacement of lost ones.

A worker is ready when it has the job's model loaded and (once the job has computed it) the job's
conditioning. A worker whose call fails because its process or node died (`ActorDiedError`,
`ActorUnavailableError`) is lost: it gets no more work, and a replacement is started at once under
the same name (runner/pool/pool.py's `create_worker`: get-if-exists, so a replacement another job
already started is shared). The replacement is joined to the job with the job's ModelSpec and
conditioning in one call, and becomes ready only when that call has returned, so it never sees
work it has no state for. A worker that answers `JobNotReadyError` (alive, but without this job's
state) is joined again the same way.

Work goes on on the ready workers meanwhile. A job left with no ready worker waits for a
replacement to be placed up to `pool.placement_timeout_s`, printing what is missing, then fails
with `WorkerLostError` naming the worker and the timeout. Each worker is replaced at most
MAX_REPLACEMENTS times per job, so a fault that kills every process it reaches cannot loop.

Every replacement is recorded (`fallbacks`, for job.json) and printed.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError

from runner.pool.placement import LOG_EVERY_S, cluster_line, model_name
from runner.pool.pool import WorkerPool, create_worker, worker_name
from runner.pool.worker import JobNotReadyError

LOST = (ActorDiedError, ActorUnavailableError)
MAX_REPLACEMENTS = 2  # per worker and job


class WorkerLostError(RuntimeError):
    """The job's workers are lost and no replacement was placed in time."""


def where(info: dict) -> str:
    return f"pid {info.get('pid')} on {info.get('host')}"


@dataclass
class Slot:
    """Worker `index` of the pool as this job sees it."""

    index: int
    handle: Any  # ActorHandle
    info: dict
    ready: bool = True
    placed_ref: Any = None  # recovery: resolves when the replacement is constructed
    join_ref: Any = None  # recovery: resolves when it has the job's model and state
    joined_with_cond: bool = False
    lost_at: float = 0.0  # when it was lost (what the job waited is counted from here)
    started_at: float = 0.0  # when the current replacement was started (its placement deadline)
    lost: str = ""  # what was lost, for messages: "pid 123 on host (ActorDiedError)"
    replacements: int = 0
    given_up: str = ""  # why this worker is out of the job for good


@dataclass
class JobWorkers:
    pool: WorkerPool
    job: str
    placement_timeout_s: float
    log: Callable[[str], None]
    slots: list[Slot] = field(default_factory=list)
    cond_ref: Any = None
    attention: Any = None  # the job's AttentionConfig (students served), given to replacements too
    fallbacks: list[dict] = field(default_factory=list)
    ending: bool = False  # the job is ending: a worker lost now is not replaced

    @classmethod
    def of(cls, pool: WorkerPool, job: str, *, placement_timeout_s: float, log) -> JobWorkers:
        slots = [Slot(i, h, info) for i, (h, info) in enumerate(zip(pool.workers, pool.infos, strict=True))]
        return cls(pool, job, placement_timeout_s, log, slots)

    # -- state -----------------------------------------------------------------------------------
    def ready(self) -> list[int]:
        return [s.index for s in self.slots if s.ready]

    def handle(self, index: int):
        return self.slots[index].handle

    def infos(self) -> list[dict]:
        return [s.info for s in self.slots]

    def pending_refs(self) -> list:
        """Refs of the recoveries in flight (ray.wait on them with the job's own calls)."""
        return [r for s in self.slots for r in (s.placed_ref, s.join_ref) if r is not None]

    # -- joining ---------------------------------------------------------------------------------
    def join_all(self) -> None:
        """Join this job to every ready worker (a second job on one WorkerPool connection)."""
        refs = {s.index: self._join(s.handle) for s in self.slots if s.ready}
        for i, ref in refs.items():
            self._settle_call(i, self.slots[i].handle, ref)

    def set_cond(self, cond) -> None:
        """Put the job's conditioning on every ready worker, and keep it for replacements."""
        self.cond_ref = ray.put(cond)
        ready = [s for s in self.slots if s.ready]
        refs = [(s.index, s.handle, s.handle.set_cond.remote(self.job, self.cond_ref)) for s in ready]
        for i, handle, ref in refs:
            self._settle_call(i, handle, ref)

    def serve_students(self, attention) -> list[list[str]]:
        """Load the job's students on every ready worker (and on replacements); their routed layers."""
        self.attention = attention
        ready = [s for s in self.slots if s.ready]
        refs = [(s.index, s.handle, s.handle.serve_students.remote(self.job, attention)) for s in ready]
        return [r for r in (self._settle_call(i, h, ref) for i, h, ref in refs) if r is not None]

    def _join(self, handle):
        return handle.join.remote(
            self.job, self.pool.spec, self.pool.idle_timeout_s, self.cond_ref, self.attention
        )

    def _settle_call(self, index: int, handle, ref) -> Any:
        try:
            return ray.get(ref)
        except (*LOST, JobNotReadyError) as err:
            self.lost(index, handle, err)
            return None

    # -- losing and replacing --------------------------------------------------------------------
    def lost(self, index: int, handle, err: BaseException) -> None:
        """A call to `handle` (worker `index`) failed with `err`: take it out of the job's work and
        start its replacement (once per lost handle; later failures of the same handle are ignored)."""
        slot = self.slots[index]
        if slot.handle is not handle or slot.given_up or slot.join_ref is not None:
            return
        slot.ready = False
        if isinstance(err, JobNotReadyError):  # alive, without this job's state: join it again
            self._start_join(slot, handle)
            return
        if not slot.lost:
            slot.lost_at = time.monotonic()
            slot.lost = f"{where(slot.info)} ({type(err).__name__})"
            self.fallbacks.append(
                {
                    "what": "worker lost",
                    "worker": index,
                    "lost": slot.lost,
                    "reason": f"worker {index} ({worker_name(self.pool.name, index)}, {slot.lost}) "
                    "was lost; its work runs again elsewhere",
                }
            )
        if self.ending:
            slot.given_up = "lost while the job was ending"
            return
        if slot.replacements >= MAX_REPLACEMENTS:
            slot.given_up = f"lost {slot.replacements + 1} times in this job"
            self.log(f"[pool] worker {index} {slot.lost} was lost again; not replacing it ({slot.given_up})")
            return
        slot.replacements += 1
        plan = self.pool.plan
        new = create_worker(
            plan, index, self.pool.worker_cls, token=uuid.uuid4().hex, idle_timeout_s=self.pool.idle_timeout_s
        )
        self.log(
            f"[pool] worker {index} ({worker_name(self.pool.name, index)}, {slot.lost}) was lost; "
            f"starting a replacement ({plan.resources.describe()})"
        )
        self._start_join(slot, new)

    def _start_join(self, slot: Slot, handle) -> None:
        slot.handle = handle
        slot.started_at = time.monotonic()
        slot.placed_ref = handle.info.remote()
        slot.join_ref = self._join(handle)
        slot.joined_with_cond = self.cond_ref is not None

    def settle(self, ref) -> None:
        """A recovery ref is ready: note the placement, or make the worker ready."""
        for slot in self.slots:
            if slot.placed_ref is not None and ref == slot.placed_ref:
                slot.placed_ref = None
                return
            if slot.join_ref is not None and ref == slot.join_ref:
                self._finish_join(slot, ref)
                return

    def _finish_join(self, slot: Slot, ref) -> None:
        handle = slot.handle
        slot.join_ref = None
        try:
            info = ray.get(ref)
        except LOST as err:  # the replacement died too: the next one, within the bound
            slot.placed_ref = None
            self.lost(slot.index, handle, err)
            return
        if self.cond_ref is not None and not slot.joined_with_cond:  # the job's conditioning came later
            self._start_join(slot, handle)
            return
        waited = time.monotonic() - slot.lost_at if slot.lost else 0.0
        if slot.lost:
            entry = {
                "what": "worker replaced",
                "worker": slot.index,
                "lost": slot.lost,
                "replacement": where(info),
                "waited_s": round(waited, 3),
                "reason": f"worker {slot.index} ({slot.lost}) was lost; a replacement ({where(info)}) "
                f"loaded model {model_name(self.pool.spec)} and the job's state after {waited:.1f} s",
            }
            self.fallbacks.append(entry)
            self.log(f"[fallback] {entry['what']}: {entry['reason']}")
        slot.info, slot.ready, slot.lost = info, True, ""

    def poll(self) -> None:
        """Settle every recovery that has finished, without waiting."""
        pending = self.pending_refs()
        if pending:
            done, _ = ray.wait(pending, num_returns=len(pending), timeout=0)
            for ref in done:
                self.settle(ref)

    def wait_ready(self) -> None:
        """Block until a worker is ready; WorkerLostError when none can be (all given up, or no
        replacement placed within pool.placement_timeout_s)."""
        last_log = time.monotonic()
        while not self.ready():
            self.poll()
            if self.ready():
                return
            recovering = [s for s in self.slots if s.join_ref is not None]
            if not recovering:
                raise WorkerLostError(f"every worker of pool '{self.pool.name}' is lost: " + self._losses())
            unplaced = [s for s in recovering if s.placed_ref is not None]
            left = max(
                (s.started_at + self.placement_timeout_s - time.monotonic() for s in unplaced), default=None
            )
            if left is not None and left <= 0 and len(unplaced) == len(recovering):
                raise WorkerLostError(self._timeout_message(unplaced))
            # past the deadline with a replacement loading its model, that one is waited for
            wait = LOG_EVERY_S if left is None or left <= 0 else min(LOG_EVERY_S, left)
            done, _ = ray.wait(self.pending_refs(), num_returns=1, timeout=wait)
            for ref in done:
                self.settle(ref)
            if not done and unplaced and time.monotonic() - last_log >= LOG_EVERY_S - 0.01:
                last_log = time.monotonic()
                left_s = max(0.0, left or 0.0)
                self.log(f"[pool] no ready worker: {self._need(unplaced)}; {left_s:.0f} s left")

    def _need(self, unplaced: Sequence[Slot]) -> str:
        names = ", ".join(f"worker {s.index}" for s in unplaced)
        res = self.pool.plan.resources
        return f"waiting for a replacement of {names} to start ({res.describe()} each); {cluster_line(res)}"

    def _timeout_message(self, unplaced: Sequence[Slot]) -> str:
        lost = "; ".join(
            f"worker {s.index} ({worker_name(self.pool.name, s.index)}, {s.lost})" for s in unplaced
        )
        return (
            f"lost {lost}, and no replacement started within pool.placement_timeout_s="
            f"{self.placement_timeout_s:g} s ({self._need(unplaced)})"
        )

    def _losses(self) -> str:
        return "; ".join(f"worker {s.index} {s.lost or ''} {s.given_up}".strip() for s in self.slots)

    # -- calls -----------------------------------------------------------------------------------
    def call(self, method: str, *args) -> Any:
        """`method(*args)` on the first ready worker; a call whose worker is lost runs once more on
        another (or the replacement), and a second loss raises (it may be what kills them)."""
        for attempt in (1, 2):
            self.poll()
            self.wait_ready()
            index = self.ready()[0]
            handle = self.slots[index].handle
            try:
                return ray.get(getattr(handle, method).remote(*args))
            except (*LOST, JobNotReadyError) as err:
                self.lost(index, handle, err)
                if attempt == 2:
                    raise RuntimeError(f"{method} lost its worker twice; giving up") from err
        raise AssertionError("unreachable")

    def call_ready(self, method: str, *args, replace: bool = True) -> list[Any]:
        """`method(*args)` on every ready worker; the answers of those that were not lost (a lost one
        is replaced unless `replace` is False: reading statistics at the end is not worth a worker)."""
        refs = [(s.index, s.handle, getattr(s.handle, method).remote(*args)) for s in self.slots if s.ready]
        answers = []
        for index, handle, ref in refs:
            try:
                answers.append(ray.get(ref))
            except (*LOST, JobNotReadyError) as err:
                if replace:
                    self.lost(index, handle, err)
        return answers

    def end(self) -> list[dict]:
        """End the job on its ready workers; stop replacements that were never placed (else they
        would hold the cluster's request, and an autoscaler's node, after the job). Returns notes."""
        self.ending = True
        joining = [s.join_ref for s in self.slots if s.join_ref is not None and s.placed_ref is None]
        if joining:  # started replacements still loading: let them finish, so the job ends on them too
            done, _ = ray.wait(joining, num_returns=len(joining), timeout=LOG_EVERY_S)
            for ref in done:
                self.settle(ref)
        notes = []
        for slot in self.slots:
            if slot.placed_ref is not None:
                ray.kill(slot.handle, no_restart=True)
                notes.append({"worker": slot.index, "stopped": "its replacement was not placed in the job"})
                slot.placed_ref = slot.join_ref = None
        self.call_ready("end_job", self.job, replace=False)
        return notes
