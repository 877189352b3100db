"""Ray's per-call cost at a step barrier: 25 calls of a 1 MiB view each, 0.17 s of simulated device
time per call, at most 2 in flight; one call at a time vs two concurrent calls sharing a device lock
(runner/pool/worker.py), with torch tensors vs numpy arrays in transit. Prints the idle seconds per step.

    python bench/dispatch_probe.py
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import ray
import torch


class Device:
    def __init__(self) -> None:
        self.lock = threading.Lock()

    def f(self, x, sleep: float):
        x = torch.from_numpy(np.array(x)) if isinstance(x, np.ndarray) else x
        with self.lock:
            start = time.perf_counter()
            time.sleep(sleep)  # the device's work
            y = x * 2
            busy = time.perf_counter() - start
        return (y.numpy() if isinstance(x, np.ndarray) else y), busy


def step(worker, views: list, sleep: float, in_flight: int = 2) -> float:
    """Idle seconds of one 25-view step: wall time minus the device's busy time."""
    start, busy, queue, pending = time.perf_counter(), 0.0, list(range(len(views))), {}
    while queue or pending:
        while queue and len(pending) < in_flight:
            i = queue.pop(0)
            pending[worker.f.remote(views[i], sleep)] = i
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            pending.pop(ref)
            busy += ray.get(ref)[1]
    return time.perf_counter() - start - busy


def main() -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False)
    views = [torch.randn(16, 128, 128) for _ in range(25)]
    for concurrency in (1, 2):
        worker = ray.remote(Device).options(max_concurrency=concurrency).remote()
        step(worker, views, 0.0)  # warm-up: actor start and first transfers
        for kind, batch in (("torch", views), ("numpy", [v.numpy() for v in views])):
            idle = [step(worker, batch, 0.17) for _ in range(3)]
            print(
                f"max_concurrency={concurrency} {kind}: idle per step {', '.join(f'{v:.3f}' for v in idle)} s"
            )


if __name__ == "__main__":
    main()
