"""A worker's activity: which jobs use it, when it was last called, and its idle timeout.

Every job-facing call of a worker passes through `Activity.call(job)`. From that the worker knows

- its idle time: seconds since the last job call ended, 0 while one runs. A worker idle longer than
  `idle_timeout_s` releases itself (`watch`), so a pool nobody uses gives its GPUs back and an
  autoscaler can reclaim the node;
- its active jobs: jobs that joined, have not ended and called within `idle_timeout_s`. A job whose
  driver died without ending counts as ended after that long, so it cannot hold the pool forever.
  With `idle_timeout_s` = 0 nothing expires (and the worker never releases itself).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator


class Activity:
    def __init__(self, idle_timeout_s: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.idle_timeout_s = idle_timeout_s
        self.clock = clock
        self.lock = threading.Lock()
        self.running = 0
        self.last = clock()
        self.jobs: dict[str, float] = {}  # job -> time of its last call

    @contextlib.contextmanager
    def call(self, job: str | None) -> Iterator[None]:
        """Mark one job call (job None: a call that belongs to no job, e.g. the pool's own setup)."""
        with self.lock:
            self.running += 1
            if job is not None:
                self.jobs[job] = self.clock()
        try:
            yield
        finally:
            with self.lock:
                self.running -= 1
                self.last = self.clock()
                if job is not None and job in self.jobs:
                    self.jobs[job] = self.last

    def end(self, job: str) -> None:
        with self.lock:
            self.jobs.pop(job, None)

    def idle_s(self) -> float:
        with self.lock:
            return 0.0 if self.running else self.clock() - self.last

    def active_jobs(self) -> dict[str, float]:
        """Active jobs and the seconds since each one's last call."""
        now = self.clock()
        with self.lock:
            ages = {job: now - t for job, t in self.jobs.items()}
        if not self.idle_timeout_s:
            return ages
        return {job: age for job, age in ages.items() if age < self.idle_timeout_s}

    def expired(self) -> bool:
        return bool(self.idle_timeout_s) and self.idle_s() > self.idle_timeout_s


def watch(activity: Activity, release: Callable[[], None], *, stop: threading.Event) -> threading.Thread:
    """A daemon thread that calls `release` once the worker has been idle past its timeout (read on
    every check, so a later job's timeout applies)."""

    def run() -> None:
        while not stop.is_set():
            timeout = activity.idle_timeout_s
            if activity.expired():
                release()
                return
            stop.wait(max(0.2, min(10.0, timeout / 4)) if timeout else 10.0)

    thread = threading.Thread(target=run, name="idle-watch", daemon=True)
    thread.start()
    return thread
