"""The model worker: a Ray actor that loads a model once and evaluates batches of views.

One worker per GPU (or a fraction of one for small models; one per CPU-only cluster). It keeps the
model loaded across jobs. Jobs `join` it with their ModelSpec: the worker serves one model at a
time, and a job asking for another model while a job it serves is active is refused
(`PoolBusyError`); with no active job it reloads. Per job, keyed by the job and removed only by
that job's `end_job` (or when the job has expired, runner/pool/activity.py), it holds the
conditioning on the device and, during a tiled VAE pass, its group of tile programs. A worker no
job has called for `idle_timeout_s` releases itself.

A batch runs through core.models.forward.forward_batch, the forward the in-process pool runs too;
tensors travel as numpy arrays in their own dtype (runner/pool/transport.py). The actor runs two
calls at once while a lock keeps the device work of one call at a time, so the next batch arrives
and the last result leaves while the device computes (docs/runner.md: the measured idle time).

Out-of-memory policy (designed fallback, reported to the driver and recorded in job.json): a batch
that does not fit is split in halves, recursively; a single view that does not fit raises
`ViewTooLargeError` naming its shape, so the job can be re-planned with smaller tiles.
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import ray
import torch

from core.attention.counters import RouteCounters
from core.control.inference import RoutingDecision
from core.distill.plan import TeacherRun
from core.models.attention_hook import layer_keys
from core.models.backbone import Cond
from core.models.forward import forward_batch
from core.models.loading import LoadedModel, ModelMeta, ModelSpec
from core.rope.spec import RopeSpec
from core.vae.lockstep import TileGroup, TileInput, VaeRound
from core.vae.tiled import Reply, VaeOp, move
from runner.distill.serving import ServedStudents
from runner.models import MODEL_CPU_THREADS, load_model, model_device
from runner.pool.activity import Activity, watch
from runner.pool.placement import WorkerResources, model_name, spec_difference
from runner.pool.transport import WireTensor, from_wire, to_wire
from tasks.distill_attention import AttentionConfig
from tasks.distill_records import LayerInfo, RunReport

if TYPE_CHECKING:
    from runner.distill.session import DistillSession


class ViewTooLargeError(RuntimeError):
    """A single view does not fit in the worker's GPU memory."""


class PoolBusyError(RuntimeError):
    """The worker serves another model to an active job; a job with a different model cannot join."""


class JobNotReadyError(RuntimeError):
    """The worker holds no state for the job (it was replaced, or the job has not joined it)."""


@dataclass(frozen=True)
class WorkerIdentity:
    """Who a pool worker is, as its pool created it: the pool, what it reserved, the token of the
    connect call that created it (how a racing creator knows whether it made the worker), and the
    idle timeout it starts with."""

    pool: str
    resources: WorkerResources
    token: str
    idle_timeout_s: float


@dataclass
class BatchResult:
    """Velocities for one batch plus what the worker observed doing it."""

    v: WireTensor  # [B, C, h, w] in the dtype of the views sent
    compute_s: float  # wall time holding the device: transfers in and out plus the forwards
    worker: int
    forward_s: float  # the forwards alone, on the device's clock (CUDA events; = compute_s on a CPU)
    oom_splits: list[int] = field(default_factory=list)  # batch sizes that ran out of memory and were split
    attention: RouteCounters | None = None  # the job's student route counters for this batch (if served)
    decisions: list[RoutingDecision] = field(default_factory=list)  # controller's new step decisions


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


def job_call(method: F) -> F:
    """A call on behalf of the job named by the first argument: counts as that job's activity."""

    @functools.wraps(method)
    def marked(self, job: str, *args, **kwargs):
        with self.activity.call(job):
            return method(self, job, *args, **kwargs)

    return marked  # type: ignore[return-value]


def pool_call(method: F) -> F:
    """A call that keeps the worker busy without naming a job (untiled VAE, batch sizing)."""

    @functools.wraps(method)
    def marked(self, *args, **kwargs):
        with self.activity.call(None):
            return method(self, *args, **kwargs)

    return marked  # type: ignore[return-value]


class ModelWorker:
    def __init__(
        self,
        index: int,
        cpu_threads: int = 1,
        gpu_memory_fraction: float = 1.0,
        *,
        identity: WorkerIdentity | None = None,
    ) -> None:
        """identity: set when the worker runs as a pool's actor (then it watches its idle time)."""
        self.index = index
        self.identity = identity
        self.device = model_device()
        if self.device.type == "cpu":
            torch.set_num_threads(MODEL_CPU_THREADS)  # not cpu_threads: numbers must not depend on it
        elif gpu_memory_fraction < 1.0:
            torch.cuda.set_per_process_memory_fraction(gpu_memory_fraction)
        self.spec: ModelSpec | None = None
        self.model: LoadedModel | None = None
        self.load_s = 0.0
        self.conds: dict[str, Cond] = {}
        self.tile_groups: dict[str, tuple[str, TileGroup]] = {}  # job -> (pass id, its tile programs)
        self.served: dict[str, ServedStudents] = {}  # job -> its students (attention: in the job file)
        self.sessions: dict[str, DistillSession] = {}  # job -> its distillation layers (task: distill)
        self.device_lock = threading.Lock()
        self.activity = Activity(identity.idle_timeout_s if identity else 0.0)
        self.stop_watch = threading.Event()
        if identity is not None:
            watch(self.activity, self._release, stop=self.stop_watch)

    def _release(self) -> None:
        """End this actor for good (idle past its timeout): its resources go back to the cluster."""
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    # -- lifecycle -------------------------------------------------------------------------------
    # info and describe run in their own concurrency group: they answer while two batches compute.
    @ray.method(concurrency_group="control")
    def info(self) -> dict:
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
            **self.describe(),
        }

    @ray.method(concurrency_group="control")
    def describe(self) -> dict:
        """The worker's pool state: what it reserved, its jobs, idle time and timeout."""
        identity = self.identity
        return {
            "pid": os.getpid(),
            "node": socket.gethostname(),
            "pool": identity.pool if identity else None,
            "token": identity.token if identity else None,
            "resources": identity.resources.as_dict() if identity else None,
            "model_name": None if self.spec is None else model_name(self.spec),
            "active_jobs": {job: round(age, 1) for job, age in self.activity.active_jobs().items()},
            "idle_s": round(self.activity.idle_s(), 1),
            "idle_timeout_s": self.activity.idle_timeout_s,
        }

    @exclusive
    def join(
        self,
        job: str,
        spec: ModelSpec,
        idle_timeout_s: float,
        cond: Cond | None = None,
        attention: AttentionConfig | None = None,
    ) -> dict:
        """Serve `job` with `spec`: load it unless loaded (refused while another active job uses
        another model), set the job's conditioning and students when given, take the job's idle
        timeout; info()."""
        if spec != self.spec:
            others = {j: age for j, age in self.activity.active_jobs().items() if j != job}
            if self.spec is not None and others:
                ages = ", ".join(f"{j} (last call {age:.0f} s ago)" for j, age in others.items())
                raise PoolBusyError(
                    f"pool worker {self._name()} serves model {model_name(self.spec)} to active job(s) "
                    f"{ages}; this job asks for another: {spec_difference(spec, self.spec)}"
                )
            with self.activity.call(None):  # a load longer than the idle timeout is not idleness
                self._load(spec)
        with self.activity.call(job):
            self.activity.idle_timeout_s = idle_timeout_s
            if cond is not None:
                self._set_cond(job, cond)
            if attention is not None:
                self._serve(job, attention)
        return self.info()

    def _name(self) -> str:
        return f"{self.identity.pool}-{self.index}" if self.identity else f"worker {self.index}"

    def _load(self, spec: ModelSpec) -> None:
        """Replace the model; every job's state goes with the old one (no active job holds any)."""
        self.model = None
        self.conds.clear()
        self.tile_groups.clear()
        self.served.clear()
        self.sessions.clear()
        for job in list(self.activity.jobs):
            self.activity.end(job)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        start = time.perf_counter()
        self.model = load_model(spec, self.device)
        self.load_s = time.perf_counter() - start
        self.spec = spec

    def _loaded(self) -> LoadedModel:
        if self.model is None:
            raise RuntimeError(f"worker {self.index} has no model loaded; call load(spec) first")
        return self.model

    @pool_call
    def model_meta(self) -> ModelMeta:
        return self._loaded().meta

    @pool_call
    def make_cond(self) -> Cond:
        """The job's conditioning on the CPU (text encoders run here, once per job)."""
        return self._loaded().make_cond()

    @job_call
    @exclusive
    def set_cond(self, job: str, cond: Cond) -> None:
        self._set_cond(job, cond)

    def _set_cond(self, job: str, cond: Cond) -> None:
        param = next(self._loaded().backbone.parameters())  # type: ignore[attr-defined]
        self.conds[job] = cond.to(self.device, param.dtype)

    @job_call
    @exclusive
    def serve_students(self, job: str, attention: AttentionConfig) -> list[str]:
        """Route this job's forwards through the students of `attention` (runner/distill/serving.py);
        returns the layers routed."""
        return list(self._serve(job, attention).layers)

    def _serve(self, job: str, attention: AttentionConfig) -> ServedStudents:
        transformer = self._loaded().backbone.transformer  # type: ignore[attr-defined]
        self.served[job] = ServedStudents(attention, transformer, self.device)
        return self.served[job]

    # -- distillation (task: distill; runner/distill/session.py) ---------------------------------
    @job_call
    @exclusive
    def distill_layers(self, job: str) -> list[LayerInfo]:
        """The model's attention layers with their shapes, in the transformer's order."""
        transformer = self._loaded().backbone.transformer  # type: ignore[attr-defined]
        c = transformer.config
        return [LayerInfo(k, c.num_attention_heads, c.attention_head_dim) for k in layer_keys(transformer)]

    @job_call
    @exclusive
    def distill_start(self, job: str, cfg, groups: dict, states: dict) -> None:
        """(Re)start this worker's share of a distillation job: the trainers of `groups`' layers,
        from `states` where given (a checkpoint), else fresh from the job's seeds."""
        from runner.distill.session import DistillSession  # the trainers' modules, only when distilling

        model = self._loaded()
        conds = {i: self._prompt_cond(prompt) for i, prompt in enumerate(cfg.teacher.prompts)}
        self.sessions[job] = DistillSession(cfg, groups, model, conds, self.device, states)

    def _prompt_cond(self, prompt: str) -> Cond:
        """The conditioning of a teacher prompt: the model's own for "" (the reference model's
        learned tokens, or the spec's prompt), else the prompt through Flux's text encoders."""
        if not prompt:
            return self._loaded().make_cond()
        from core.models.text import FluxTextEncoder

        spec = self.spec
        dtype = next(self._loaded().backbone.parameters()).dtype  # type: ignore[attr-defined]
        encoder = FluxTextEncoder(spec.path, dtype=dtype, device=self.device)
        guidance = spec.guidance if self._loaded().backbone.has_guidance else None  # type: ignore[attr-defined]
        return encoder.encode(prompt, guidance=guidance)

    @job_call
    @exclusive
    def distill_run(self, job: str, run: TeacherRun) -> RunReport:
        """One teacher run of this worker's groups: sample with capture, train, validate."""
        session = self.sessions.get(job)
        if session is None:
            raise JobNotReadyError(f"{self._name()}: no distillation session for job {job}")
        return session.run(run, self.index)

    @exclusive
    def end_job(self, job: str) -> None:
        """Drop this job's state (only this job's: other jobs sharing the worker keep theirs)."""
        self.conds.pop(job, None)
        self.tile_groups.pop(job, None)
        self.served.pop(job, None)
        self.sessions.pop(job, None)
        self.activity.end(job)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- views -----------------------------------------------------------------------------------
    @pool_call
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

    @job_call
    def velocity(
        self,
        job: str,
        x: WireTensor,
        sigma: WireTensor,
        rope: RopeSpec | None,
        step: int | None = None,
        view_ids: tuple[int, ...] | None = None,
    ) -> BatchResult:
        """Velocities of one stacked batch of views (x [B, C, h, w], sigma [B]), in x's dtype.
        step, view_ids: what the job's attention routes are told (core.models.forward.ViewBatch)."""
        x_t, sigma_t = from_wire(x), from_wire(sigma)
        splits: list[int] = []
        cuda = self.device.type == "cuda"
        with self.device_lock:
            cond = self.conds.get(job)
            if cond is None:
                raise JobNotReadyError(f"{self._name()}: no conditioning for job {job}; join it first")
            served = self.served.get(job)
            transformer = self._loaded().backbone.transformer  # type: ignore[attr-defined]
            start = time.perf_counter()
            if cuda:
                began, ended = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                began.record()
            with served.routed(transformer) if served is not None else contextlib.nullcontext():
                v = self._forward(cond, x_t, sigma_t, rope, splits, (step, view_ids))
            if cuda:
                ended.record()
            v = v.cpu()  # synchronises the device
            compute = time.perf_counter() - start
            counters = served.take_counters() if served is not None else None
            decisions = served.take_decisions() if served is not None else []
        forward = began.elapsed_time(ended) / 1000 if cuda else compute
        return BatchResult(to_wire(v), compute, self.index, forward, splits, counters, decisions)

    def _forward(
        self,
        cond: Cond,
        x: torch.Tensor,
        sigma: torch.Tensor,
        rope: RopeSpec | None,
        splits: list[int],
        ids: tuple[int | None, tuple[int, ...] | None] = (None, None),
    ) -> torch.Tensor:
        backbone = self._loaded().backbone
        step, view_ids = ids
        try:
            return forward_batch(
                backbone, cond, x, sigma, rope, device=self.device, step=step, view_ids=view_ids
            )
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
        step, view_ids = ids
        first_ids = (step, view_ids[:half] if view_ids is not None else None)
        second_ids = (step, view_ids[half:] if view_ids is not None else None)
        first = self._forward(cond, x[:half], sigma[:half], rope, splits, first_ids)
        second = self._forward(cond, x[half:], sigma[half:], rope, splits, second_ids)
        return torch.cat([first, second])

    def memory(self) -> dict:
        """Peak and current GPU memory of this worker, in GiB; on a CPU the process's peak resident
        memory (Linux reports ru_maxrss in KiB)."""
        gib = 1024**3
        if self.device.type != "cuda":
            return {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3)}
        return {
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated(self.device) / gib, 3),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved(self.device) / gib, 3),
            "allocated_gib": round(torch.cuda.memory_allocated(self.device) / gib, 3),
            "total_gib": round(torch.cuda.get_device_properties(self.device).total_memory / gib, 3),
        }

    # -- VAE -------------------------------------------------------------------------------------
    @pool_call
    @exclusive
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._loaded().vae.encode(images.to(self.device)).float().cpu()

    @pool_call
    @exclusive
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._loaded().vae.decode(latents.to(self.device)).float().cpu()

    @job_call
    @exclusive
    def vae_start(self, job: str, pass_id: str, op: VaeOp, tiles: list[TileInput]) -> None:
        """Start the tile programs of `tiles` for this job's tiled pass `pass_id` (core/vae/lockstep.py);
        the first vae_advance (reply None) runs them to their first request. A pass started again
        (after a worker of it was lost) replaces the old programs."""
        self.tile_groups[job] = (pass_id, TileGroup.start(self._loaded().vae, op, tiles))

    @job_call
    @exclusive
    def vae_advance(self, job: str, pass_id: str, reply: Reply | None) -> VaeRound:
        """One step of this worker's tile group: requests or output cores, on the CPU."""
        held = self.tile_groups.get(job)
        if held is None or held[0] != pass_id:
            raise JobNotReadyError(f"{self._name()}: no tiled VAE pass {pass_id} of job {job}")
        group = held[1]
        result = group.advance(None if reply is None else move(reply, self.device)).to("cpu")
        if result.done:
            del self.tile_groups[job]
        return result
