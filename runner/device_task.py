"""Tasks that own one device (training): run inside a one-GPU actor when the cluster has GPUs, so
the job's driver reserves no GPU, or in this process on a CPU-only machine.

The task's records, fallbacks, timings and progress come back to the driver's job record when the
task ends, and also when it fails or is interrupted (the actor is asked for what it has so far
before it is released), so a failed training run's job.json keeps what it measured.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from runner.config import Job, TrackingConfig
from runner.context import JobArtifacts
from runner.fingerprint import Fingerprint
from runner.models import WEIGHTS, model_device
from runner.tracking import Tracker

PARTIAL_TIMEOUT_S = 10.0


class DeviceContext(JobArtifacts):
    """Artifacts plus the device the task owns and the repository's weight folders
    (tasks.context.TrainContext)."""

    def __init__(
        self,
        output: Path,
        device: torch.device,
        tracker: Tracker | None = None,
        stream=None,
        *,
        fingerprint: Fingerprint | None = None,
    ) -> None:
        super().__init__(output, tracker, stream, fingerprint=fingerprint)
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
    """Runs a device task; its artifacts go to the job's output folder. In an actor it serves two
    calls at once, so `partial` answers while `run` is still going (an interrupted job)."""

    def __init__(self) -> None:
        self.ctx: DeviceContext | None = None
        self.backends: dict = {}

    def run(self, job: Job, output: str, tracking: TrackingConfig, fingerprint: Fingerprint) -> dict:
        device = model_device()
        self.backends = configure_backends(device)
        tracker = Tracker(Path(output), tracking, job.resolved, name=f"{job.task.name}:{Path(output).name}")
        stamp = fingerprint.with_numerics(devices=[device.type])
        self.ctx = DeviceContext(Path(output), device, tracker, stream=sys.stdout, fingerprint=stamp)
        try:
            result = job.task.run_fn()(job.config, self.ctx)
        finally:
            tracker.end()
        return {**self.partial(), "result": summarize(result)}

    def partial(self) -> dict:
        """What the task recorded so far."""
        ctx = self.ctx
        if ctx is None:
            return {}
        return {
            "records": {**ctx.records, "backends": self.backends},
            "fallbacks": list(ctx.fallbacks),
            "timings": dict(ctx.timings),
            "set_aside": list(ctx.set_aside),
            "checkpoints": dict(ctx.checkpoints),
            "progress": ctx.last_progress,
            "fingerprint": ctx.fingerprint,
        }


def _merge(arts: JobArtifacts, out: dict) -> None:
    arts.records.update(out.get("records", {}))
    arts.fallbacks.extend(out.get("fallbacks", []))
    for k, v in out.get("timings", {}).items():
        arts.timings[k] = arts.timings.get(k, 0.0) + v
    arts.set_aside.extend(out.get("set_aside", []))
    arts.checkpoints.update(out.get("checkpoints", {}))
    arts.last_progress = out.get("progress") or arts.last_progress
    arts.fingerprint = out.get("fingerprint") or arts.fingerprint


def _partial_from_actor(actor) -> dict:
    import ray

    try:
        return ray.get(actor.partial.remote(), timeout=PARTIAL_TIMEOUT_S)
    except ray.exceptions.RayError as err:  # a dead actor, or no answer in time
        return {"records": {"device_task_record_lost": f"{type(err).__name__}: {err}"}}


def run_device_task(job: Job, arts: JobArtifacts) -> Any:
    """Run a device task in a one-GPU actor (released when it ends, fails or is interrupted), or here;
    its record joins `arts` either way."""
    import ray

    args = (job, str(arts.output), job.runner.tracking, arts.fingerprint)
    if ray.cluster_resources().get("GPU", 0.0) >= 1:
        actor = ray.remote(DeviceTaskRunner).options(num_gpus=1, num_cpus=1, max_concurrency=2).remote()
        try:
            out = ray.get(actor.run.remote(*args))
        except BaseException:
            _merge(arts, _partial_from_actor(actor))
            raise
        finally:
            ray.kill(actor)
    else:
        runner = DeviceTaskRunner()
        try:
            out = runner.run(*args)
        except BaseException:
            _merge(arts, runner.partial())
            raise
    _merge(arts, out)
    return out["result"]
