"""Fan views out over the worker pool with a bounded number of batches in flight.

Batches are formed by `core.models.forward.view_batches` (a function of the views only, as in
process) and each runs whole on one worker, so the output does not depend on how many workers there
are or which one was free. Whichever worker has the fewest batches in flight gets the next one;
`ray.wait` returns results as they complete and they are placed by index, so completion order
changes nothing.

A batch whose worker died is re-queued on another worker once; a second loss raises. Workers are
created with max_task_retries=0, so Ray never re-runs a call that crashed its worker: a poison
input that kills whichever process runs it would otherwise burn every restart of the pool
(docs/runner.md).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import ray
import torch
from ray.exceptions import ActorDiedError, ActorUnavailableError

from core.models.forward import place, view_batches
from core.tiling.views import ViewInput
from runner.pool.transport import from_wire, to_wire
from runner.pool.worker import BatchResult
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


class Dispatcher:
    def __init__(
        self,
        workers: Sequence,
        job: str,
        *,
        max_batch: int | Callable[[tuple[int, ...]], int],
        max_in_flight: int = 2,
    ) -> None:
        if not workers:
            raise ValueError("a dispatcher needs at least one worker")
        self.workers = list(workers)
        self.alive = [True] * len(self.workers)
        self.job = job
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self.stats = DispatchStats()

    def evaluate(self, views: Sequence[ViewInput]) -> list[torch.Tensor]:
        start = time.perf_counter()
        batches = view_batches(views, self.max_batch)
        for batch in batches:
            self.stats.batch_sizes.setdefault("x".join(map(str, batch.x.shape[1:])), len(batch.index))
        queue = deque(range(len(batches)))
        retries: dict[int, int] = {}
        in_flight: dict[ray.ObjectRef, tuple[int, int]] = {}  # ref -> (batch, worker)
        load = [0] * len(self.workers)
        busy = [0.0] * len(self.workers)
        out: list[torch.Tensor | None] = [None] * len(views)
        while queue or in_flight:
            while queue:
                candidates = [
                    w for w in range(len(self.workers)) if self.alive[w] and load[w] < self.max_in_flight
                ]
                if not candidates:
                    break
                w = min(candidates, key=lambda i: (load[i], i))
                b = queue.popleft()
                batch = batches[b]
                ref = self.workers[w].velocity.remote(
                    self.job, to_wire(batch.x), to_wire(batch.sigma), batch.rope
                )
                in_flight[ref] = (b, w)
                load[w] += 1
            if not in_flight:
                raise RuntimeError("no live workers left to evaluate views")
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in ready:
                b, w = in_flight.pop(ref)
                load[w] -= 1
                try:
                    result: BatchResult = ray.get(ref)
                except (ActorDiedError, ActorUnavailableError) as err:
                    self.alive[w] = False
                    retries[b] = retries.get(b, 0) + 1
                    if retries[b] > 1:
                        raise RuntimeError(f"batch {b} lost its worker twice; giving up") from err
                    self.stats.requeued.append({"batch": b, "worker": w, "error": type(err).__name__})
                    queue.appendleft(b)
                    continue
                place(out, batches[b], from_wire(result.v))
                busy[w] += result.compute_s
                self.stats.model_s += result.compute_s
                self.stats.forward_s += result.forward_s
                self.stats.busy_s[w] = self.stats.busy_s.get(w, 0.0) + result.compute_s
                if result.oom_splits:
                    self.stats.oom_splits.append({"worker": w, "batch_sizes": result.oom_splits})
        self.stats.calls += 1
        self.stats.views += len(views)
        self.stats.batches += len(batches)
        wall = time.perf_counter() - start
        self.stats.wall_s += wall
        self.stats.call_s.setdefault(len(views), []).append(wall)
        self.stats.critical_s += max(busy)
        return out  # type: ignore[return-value]
