"""Tasks that own one device (training): run inside a one-GPU actor when the cluster has GPUs, so
the job's driver reserves no GPU, or in this process on a CPU-only machine."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import ray
import torch

from runner.config import Job, TrackingConfig
from runner.context import JobArtifacts
from runner.models import WEIGHTS, model_device
from runner.tracking import Tracker


class DeviceContext(JobArtifacts):
    """Artifacts plus the device the task owns and the repository's weight folders
    (tasks.context.TrainContext)."""

    def __init__(
        self, output: Path, device: torch.device, tracker: Tracker | None = None, stream=None
    ) -> None:
        super().__init__(output, tracker, stream)
        self.device = device
        self.weights = WEIGHTS


def configure_backends(device: torch.device) -> dict:
    """Process-wide backend choices for training, recorded in job.json.

    cuDNN's SDPA backward fails on small Flux configurations (an illegal memory access for 6 heads x
    64 at 260 tokens, seen on an H100; docs/runner.md), so it is off; flash and memory-efficient SDPA
    remain.
    """
    if device.type != "cuda":
        return {}
    torch.backends.cuda.enable_cudnn_sdp(False)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return {"cudnn_sdp": False, "tf32": True, "device_name": torch.cuda.get_device_name(device)}


def summarize(result: Any) -> Any:
    """A task result's summary for job.json: a dict as is, else its summary() if it has one."""
    if result is None or isinstance(result, dict):
        return result
    summary = getattr(result, "summary", None)
    return summary() if callable(summary) else None


class DeviceTaskRunner:
    """The actor that runs a device task; its artifacts go to the same output folder."""

    def run(self, job: Job, output: str, tracking: TrackingConfig) -> dict:
        device = model_device()
        backends = configure_backends(device)
        tracker = Tracker(Path(output), tracking, job.resolved, name=f"{job.task.name}:{Path(output).name}")
        ctx = DeviceContext(Path(output), device, tracker, stream=sys.stdout)
        try:
            result = job.task.run_fn()(job.config, ctx)
        finally:
            tracker.end()
        return {
            "records": {**ctx.records, "backends": backends},
            "fallbacks": ctx.fallbacks,
            "timings": ctx.timings,
            "result": summarize(result),
        }


def run_device_task(job: Job, arts: JobArtifacts) -> tuple[Any, dict]:
    """Run a device task in a one-GPU actor (released when it ends, fails or is interrupted), or here."""
    gpus = ray.cluster_resources().get("GPU", 0.0)
    if gpus >= 1:
        actor = ray.remote(DeviceTaskRunner).options(num_gpus=1, num_cpus=1).remote()
        try:
            out = ray.get(actor.run.remote(job, str(arts.output), job.runner.tracking))
        finally:
            ray.kill(actor)
    else:
        out = DeviceTaskRunner().run(job, str(arts.output), job.runner.tracking)
    arts.records.update(out["records"])
    arts.fallbacks.extend(out["fallbacks"])
    for k, v in out["timings"].items():
        arts.timings[k] = arts.timings.get(k, 0.0) + v
    return out["result"], {}
