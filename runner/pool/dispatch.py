"""Fan views out over the worker pool with a bounded number of batches in flight.

Batches are formed by `core.models.forward.view_batches` (a function of the views only, as in
process) and each runs whole on one worker, so the output does not depend on how many workers there
are or which one was free. Whichever worker has the fewest batches in flight gets the next one;
`ray.wait` returns results as they complete and they are placed by index, so completion order
changes nothing.

A batch whose worker died is re-queued once, on another worker or on the lost one's replacement
(runner/pool/job_workers.py: a replacement gets work only once it has the job's model and
conditioning); a second loss of the same batch raises. Workers are created with max_restarts=0 and
max_task_retries=0, so Ray never re-runs a call that crashed its worker: a poison input that kills
whichever process runs it would otherwise burn every restart of the pool (docs/runner.md).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import ray
import torch

from core.attention.counters import RouteCounters
from core.models.forward import place, view_batches
from core.tiling.views import ViewInput
from runner.distill.serving import add_counters
from runner.pool.job_workers import LOST, JobWorkers
from runner.pool.transport import from_wire, to_wire
from runner.pool.worker import BatchResult, JobNotReadyError
from runner.timing import stats


@dataclass
class DispatchStats:
    """Accumulated over a job: wall time inside evaluate, worker compute, per-worker busy time."""

    calls: int = 0
    views: int = 0
    batches: int = 0
    wall_s: float = 0.0
    model_s: float = 0.0
    forward_s: float = 0.0  # of model_s, the forwards alone on the device's clock (the rest: transfers)
    critical_s: float = (
        0.0  # per call, the busiest worker's compute time: the floor for that call's wall time
    )
    busy_s: dict[int, float] = field(default_factory=dict)
    oom_splits: list[dict] = field(default_factory=list)
    requeued: list[dict] = field(default_factory=list)
    batch_sizes: dict[str, int] = field(default_factory=dict)
    call_s: dict[int, list[float]] = field(default_factory=dict)  # wall time per call, by its view count
    attention: RouteCounters = field(default_factory=RouteCounters)  # students served (attention:)
    decisions: list = field(default_factory=list)  # the controller's step decisions, as they arrive

    def summary(self) -> dict:
        return {
            "evaluate_calls": self.calls,
            "views": self.views,
            "batches": self.batches,
            "evaluate_wall_s": round(self.wall_s, 4),
            "model_s": round(self.model_s, 4),
            "forward_s": round(self.forward_s, 4),
            "dispatch_overhead_s": round(self.wall_s - self.critical_s, 4),
            "worker_busy_s": {str(k): round(v, 4) for k, v in sorted(self.busy_s.items())},
            "batch_size_by_shape": self.batch_sizes,
            # one call is one sampler step's views: median and spread of the step times, by view count
            "evaluate_call_s_by_views": {str(n): stats(t) for n, t in sorted(self.call_s.items())},
        }


@dataclass(frozen=True)
class Flight:
    """A batch in flight: which batch, on which worker, through which handle."""

    batch: int
    worker: int
    handle: object


class Dispatcher:
    def __init__(
        self,
        workers: JobWorkers,
        *,
        max_batch: int | Callable[[tuple[int, ...]], int],
        max_in_flight: int = 2,
    ) -> None:
        if not workers.slots:
            raise ValueError("a dispatcher needs at least one worker")
        self.workers = workers
        self.job = workers.job
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self.stats = DispatchStats()

    def evaluate(self, views: Sequence[ViewInput]) -> list[torch.Tensor]:
        start = time.perf_counter()
        batches = view_batches(views, self.max_batch)
        for batch in batches:
            self.stats.batch_sizes.setdefault("x".join(map(str, batch.x.shape[1:])), len(batch.index))
        self.workers.poll()
        queue = deque(range(len(batches)))
        losses: dict[int, int] = {}
        in_flight: dict[ray.ObjectRef, Flight] = {}
        load = [0] * len(self.workers.slots)
        busy = [0.0] * len(self.workers.slots)
        out: list[torch.Tensor | None] = [None] * len(views)
        while queue or in_flight:
            self._submit(batches, queue, in_flight, load)
            if not in_flight:
                self.workers.wait_ready()  # every worker lost: wait for a replacement (or fail)
                continue
            ready, _ = ray.wait([*in_flight, *self.workers.pending_refs()], num_returns=1)
            for ref in ready:
                flight = in_flight.pop(ref, None)
                if flight is None:  # a replacement's placement or join
                    self.workers.settle(ref)
                    continue
                load[flight.worker] -= 1
                try:
                    result: BatchResult = ray.get(ref)
                except (*LOST, JobNotReadyError) as err:
                    self._requeue(flight, err, losses, queue)
                    continue
                place(out, batches[flight.batch], from_wire(result.v))
                self._account(flight.worker, result, busy)
        self.stats.calls += 1
        self.stats.views += len(views)
        self.stats.batches += len(batches)
        wall = time.perf_counter() - start
        self.stats.wall_s += wall
        self.stats.call_s.setdefault(len(views), []).append(wall)
        self.stats.critical_s += max(busy)
        return out  # type: ignore[return-value]

    def _submit(self, batches, queue: deque, in_flight: dict, load: list[int]) -> None:
        """Give queued batches to the ready workers with the fewest in flight, up to max_in_flight."""
        while queue:
            candidates = [w for w in self.workers.ready() if load[w] < self.max_in_flight]
            if not candidates:
                return
            w = min(candidates, key=lambda i: (load[i], i))
            b = queue.popleft()
            batch = batches[b]
            handle = self.workers.handle(w)
            ref = handle.velocity.remote(
                self.job, to_wire(batch.x), to_wire(batch.sigma), batch.rope, batch.step, batch.view_ids
            )
            in_flight[ref] = Flight(b, w, handle)
            load[w] += 1

    def _requeue(self, flight: Flight, err: BaseException, losses: dict[int, int], queue: deque) -> None:
        """The batch's worker is lost (or lacks the job's state): run the batch again, once."""
        self.workers.lost(flight.worker, flight.handle, err)
        if not isinstance(err, JobNotReadyError):  # a crash: the batch may be what crashes workers
            losses[flight.batch] = losses.get(flight.batch, 0) + 1
            if losses[flight.batch] > 1:
                raise RuntimeError(f"batch {flight.batch} lost its worker twice; giving up") from err
        self.stats.requeued.append(
            {"batch": flight.batch, "worker": flight.worker, "error": type(err).__name__}
        )
        queue.appendleft(flight.batch)

    def _account(self, w: int, result: BatchResult, busy: list[float]) -> None:
        busy[w] += result.compute_s
        self.stats.model_s += result.compute_s
        self.stats.forward_s += result.forward_s
        self.stats.busy_s[w] = self.stats.busy_s.get(w, 0.0) + result.compute_s
        if result.oom_splits:
            self.stats.oom_splits.append({"worker": w, "batch_sizes": result.oom_splits})
        if result.attention is not None:
            add_counters(self.stats.attention, result.attention)
        self.stats.decisions.extend(result.decisions)
