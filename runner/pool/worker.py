"""The model worker: a Ray actor that loads a model once and evaluates batches of views.

One worker per GPU (or a fraction of one for small models; one per CPU-only cluster). It keeps the
model loaded across jobs and reloads only when a job names a different ModelSpec. Per job it holds
the conditioning on the device and, during a tiled VAE pass, the tile programs it was given.

Transport and concurrency: views travel as numpy arrays (Ray moves them zero-copy, pickled torch
tensors cost twice the time), and the actor runs two calls at once while a lock keeps the device
work of one call at a time: the next call's arguments arrive and the previous call's result leaves
while the GPU computes, so Ray's per-call overhead stays off the critical path (bench/dispatch_probe.py
on a 2-core CPU: 42-62 ms of idle time per 25-view step instead of 105-133 ms one call at a time).

Out-of-memory policy (designed fallback, reported to the driver and recorded in job.json): a batch
that does not fit is split in halves, recursively; a single view that does not fit raises
`ViewTooLargeError` naming its shape, so the job can be re-planned with smaller tiles.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch

from core.models.backbone import Cond
from core.models.loading import LoadedModel, ModelSpec, load_model
from core.rope.spec import RopeSpec
from core.tiling.rect import Rect


class ViewTooLargeError(RuntimeError):
    """A single view does not fit in the worker's GPU memory."""


@dataclass
class BatchResult:
    """Velocities for one batch plus what the worker observed doing it."""

    v: np.ndarray  # [B, C, h, w] float32
    compute_s: float  # wall time holding the device: transfers in and out plus the forwards
    worker: int
    forward_s: float  # the forwards alone, on the device's clock (CUDA events; = compute_s on a CPU)
    oom_splits: list[int] = field(default_factory=list)  # batch sizes that ran out of memory and were split


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


F = TypeVar("F", bound=Callable)


def exclusive(method: F) -> F:
    """Run a method under the worker's device lock (one call's device work at a time)."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self.device_lock:
            return method(self, *args, **kwargs)

    return locked  # type: ignore[return-value]


def as_tensor(a: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A writable tensor from a transported array (Ray hands numpy arrays over read-only)."""
    return torch.from_numpy(np.array(a)) if isinstance(a, np.ndarray) else a


class ModelWorker:
    def __init__(self, index: int, cpu_threads: int = 1, gpu_memory_fraction: float = 1.0) -> None:
        self.index = index
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, cpu_threads))
        elif gpu_memory_fraction < 1.0:
            torch.cuda.set_per_process_memory_fraction(gpu_memory_fraction)
        self.spec: ModelSpec | None = None
        self.model: LoadedModel | None = None
        self.load_s = 0.0
        self.conds: dict[str, Cond] = {}
        self.programs: dict[str, list[tuple[int, Generator]]] = {}
        self.device_lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------------
    def info(self) -> dict:
        import ray

        gpu_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None
        return {
            "index": self.index,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
            "device": str(self.device),
            "device_name": gpu_name or "cpu",
            "torch_threads": torch.get_num_threads(),
            "model": None if self.spec is None else self.spec.__dict__,
            "load_s": round(self.load_s, 3),
        }

    @exclusive
    def load(self, spec: ModelSpec) -> dict:
        """Load `spec` unless it is already loaded; returns info()."""
        if spec != self.spec:
            self.model = None
            self.conds.clear()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            start = time.perf_counter()
            self.model = load_model(spec, self.device)
            self.load_s = time.perf_counter() - start
            self.spec = spec
        return self.info()

    def _loaded(self) -> LoadedModel:
        if self.model is None:
            raise RuntimeError(f"worker {self.index} has no model loaded; call load(spec) first")
        return self.model

    def model_meta(self) -> dict:
        model = self._loaded()
        return {
            "latent_channels": model.backbone.latent_channels,
            "native_size": model.backbone.native_size,
            "vae_scale_factor": model.vae.scale_factor,
            "encode_halo": model.vae.encode_halo,
            "decode_halo": model.vae.decode_halo,
        }

    def make_cond(self) -> Cond:
        """The job's conditioning on the CPU (text encoders run here, once per job)."""
        return self._loaded().make_cond()

    @exclusive
    def set_cond(self, job: str, cond: Cond) -> None:
        param = next(self._loaded().backbone.parameters())  # type: ignore[attr-defined]
        self.conds[job] = cond.to(self.device, param.dtype)

    @exclusive
    def end_job(self, job: str) -> None:
        self.conds.pop(job, None)
        self.programs.pop(job, None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- views -----------------------------------------------------------------------------------
    def max_batch(self, shape: Sequence[int]) -> int:
        """Views of `shape` [C, h, w] per forward: 4 on a CPU. On a GPU, enough views to reach about
        8192 tokens per forward (a 1024 px Flux view already saturates an H100, so batching it buys
        nothing and only hurts load balance), at most 8, and no more than half the free memory holds."""
        if self.device.type != "cuda":
            return 4
        backbone = self._loaded().backbone
        t = backbone.transformer  # type: ignore[attr-defined]
        tokens = shape[1] * shape[2] // 4 + 512
        width = t.config.num_attention_heads * t.config.attention_head_dim
        per_view = tokens * width * 2 * 16  # bf16 activations of one block incl. the 4x MLP, with margin
        free, _ = torch.cuda.mem_get_info(self.device)
        limit = min(8, max(1, 8192 // tokens), max(1, int(0.5 * free // per_view)))
        batch = 1
        while batch * 2 <= limit:
            batch *= 2
        return batch

    def velocity(
        self, job: str, x: np.ndarray | torch.Tensor, sigma: np.ndarray | torch.Tensor, rope: RopeSpec | None
    ) -> BatchResult:
        if job not in self.conds:
            raise RuntimeError(f"worker {self.index}: no conditioning for job {job}; call set_cond first")
        x, sigma = as_tensor(x), as_tensor(sigma)
        splits: list[int] = []
        cuda = self.device.type == "cuda"
        with self.device_lock:
            start = time.perf_counter()
            if cuda:
                began, ended = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                began.record()
            v = self._forward(self.conds[job], x, sigma, rope, splits)
            if cuda:
                ended.record()
            v = v.float().cpu()  # synchronises the device
            compute = time.perf_counter() - start
        forward = began.elapsed_time(ended) / 1000 if cuda else compute
        return BatchResult(v.numpy(), compute, self.index, forward, splits)

    def _forward(
        self, cond: Cond, x: torch.Tensor, sigma: torch.Tensor, rope: RopeSpec | None, splits: list[int]
    ) -> torch.Tensor:
        backbone = self._loaded().backbone
        try:
            with torch.no_grad():
                return backbone.velocity(x.to(self.device), sigma.to(self.device), cond, rope)
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not _is_oom(err):
                raise
            reason = str(err).splitlines()[0]
        # Split outside the except block: the exception's traceback holds the failed forward's frames
        # and with them its activations, so halves run inside it would run out of memory too.
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        b = x.shape[0]
        if b == 1:
            raise ViewTooLargeError(
                f"worker {self.index}: one view of shape {tuple(x.shape[1:])} does not fit in GPU "
                f"memory ({reason}); use smaller tiles"
            )
        splits.append(b)
        half = b // 2
        first = self._forward(cond, x[:half], sigma[:half], rope, splits)
        second = self._forward(cond, x[half:], sigma[half:], rope, splits)
        return torch.cat([first, second])

    def memory(self) -> dict:
        """Peak and current GPU memory of this worker, in GiB (empty on a CPU)."""
        if self.device.type != "cuda":
            return {}
        gib = 1024**3
        return {
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated(self.device) / gib, 3),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved(self.device) / gib, 3),
            "allocated_gib": round(torch.cuda.memory_allocated(self.device) / gib, 3),
            "total_gib": round(torch.cuda.get_device_properties(self.device).total_memory / gib, 3),
        }

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
        """Bare forward times of `batch` views of `shape` [C, h, w] on this worker (benchmarks' floor):
        seconds per forward, synchronised, plus the peak memory of those forwards. pause_s idles the
        device before each forward, as a tiled job's step barrier does."""
        cond = self.conds[job]
        backbone = self._loaded().backbone
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch, *shape, generator=gen).to(self.device)
        sigma = torch.full((batch,), 0.6, device=self.device)
        self.reset_peak_memory()
        times = []
        with torch.no_grad():
            for i in range(warmup + reps):
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                if pause_s > 0:
                    time.sleep(pause_s)
                start = time.perf_counter()
                backbone.velocity(x, sigma, cond, None)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                if i >= warmup:
                    times.append(time.perf_counter() - start)
        return {"times_s": times, **self.memory()}

    # -- VAE -------------------------------------------------------------------------------------
    @exclusive
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._loaded().vae.encode(images.to(self.device)).float().cpu()

    @exclusive
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._loaded().vae.decode(latents.to(self.device)).float().cpu()

    @exclusive
    def vae_start(
        self, job: str, op: str, tiles: list[tuple[int, torch.Tensor, Rect]]
    ) -> tuple[str, list[tuple[int, object]]]:
        """Start tile programs (op "encode" or "decode") for the tiles given and run them to their
        first reduction request: ("request", [(tile, request)]) or, with no reduction, ("done", outputs)."""
        vae = self._loaded().vae
        make = {"encode": vae.encode_program, "decode": vae.decode_program}[op]  # type: ignore[attr-defined]
        self.programs[job] = [(i, make(window.to(self.device), core)) for i, window, core in tiles]
        return self._advance(job, None)

    @exclusive
    def vae_send(self, job: str, reply: object) -> tuple[str, list[tuple[int, object]]]:
        """Send the round's reduced reply to every program held for `job`; same return as vae_start."""
        return self._advance(job, _to(reply, self.device))

    def _advance(self, job: str, reply: object) -> tuple[str, list[tuple[int, object]]]:
        requests, outputs = [], []
        with torch.no_grad():
            for i, program in self.programs[job]:
                try:
                    requests.append((i, _cpu(program.send(reply))))  # send(None) starts a generator
                except StopIteration as stop:
                    outputs.append((i, stop.value.float().cpu()))
        if outputs and requests:
            raise RuntimeError(f"worker {self.index}: tile programs of job {job} fell out of lockstep")
        if outputs:
            del self.programs[job]
            return "done", outputs
        return "request", requests


def _cpu(obj: object) -> object:
    return _to(obj, torch.device("cpu"))


def _to(obj: object, device: torch.device) -> object:
    """Move the tensors of a reduction request/reply dataclass to `device`."""
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return type(obj)(
            **{
                f.name: (
                    getattr(obj, f.name).to(device)
                    if torch.is_tensor(getattr(obj, f.name))
                    else getattr(obj, f.name)
                )
                for f in dataclasses.fields(obj)
            }
        )
    return obj
