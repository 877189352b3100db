"""Shared pieces of the benchmarks: environment facts, timing statistics, result files, and the
benchmark worker (the production ModelWorker plus the measurements only benchmarks ask for)."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from core.models.forward import forward_batch
from runner.pool.worker import ModelWorker, exclusive
from runner.timing import stats  # noqa: F401  (the benchmarks' timing statistics)

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "not installed"

    gpus = []
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": version("diffusers"),
        "ray": version("ray"),
        "gpus": gpus,
        "cpu_count": os.cpu_count(),
    }


def write_result(name: str, data: dict[str, Any]) -> Path:
    """bench/results/<name>.json, and a copy under $OUT when the device tool runs us."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2) + "\n"
    path = RESULTS / f"{name}.json"
    path.write_text(text)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{name}.json").write_text(text)
    return path


class BenchWorker(ModelWorker):
    """A ModelWorker that also times bare forwards and resets its peak-memory counters; benchmarks
    create their pools with it (`connect_pool(..., worker_cls=BenchWorker)`)."""

    def reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    @exclusive
    def time_forward(
        self,
        job: str,
        shape: Sequence[int],
        batch: int,
        *,
        warmup: int = 2,
        reps: int = 5,
        pause_s: float = 0.0,
    ) -> dict:
        """Bare forward times of `batch` views of `shape` [C, h, w] on this worker (the floor a job's
        time is compared with): seconds per forward, synchronised, plus the peak memory of those
        forwards. pause_s idles the device before each forward, as a tiled job's step barrier does."""
        cond = self.conds[job]
        backbone = self._loaded().backbone
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch, *shape, generator=gen).to(self.device)
        sigma = torch.full((batch,), 0.6, device=self.device)
        self.reset_peak_memory()
        times = []
        for i in range(warmup + reps):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            if pause_s > 0:
                time.sleep(pause_s)
            start = time.perf_counter()
            forward_batch(backbone, cond, x, sigma, None)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
        return {"times_s": times, **self.memory()}
