"""The Ray side of `tasks.context.ModelPool`: views through the dispatcher, conditioning computed
once and broadcast by reference, and the VAE (tiled passes spread over every ready worker).

Every call goes through the job's `JobWorkers`, so a lost worker is replaced (with the job's model
and conditioning) and its work runs again: the job's result is the one an undisturbed run gives.
`summary()` is the pool part of job.json: how the pool was made (created or reused, and why), the
workers, the dispatch statistics and every designed fallback as a job.json entry (`fallbacks`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from core.models.backbone import Cond
from core.models.loading import ModelMeta
from core.tiling.views import ViewInput
from core.vae.tiled import VaeOp
from runner.config import PoolConfig
from runner.distill.serving import StudentsServing
from runner.pool.dispatch import Dispatcher
from runner.pool.job_workers import JobWorkers
from runner.pool.pool import WorkerPool, console
from runner.pool.vae_pool import tiled_over_pool
from tasks.distill_attention import AttentionConfig


class RayModelPool:
    def __init__(
        self,
        pool: WorkerPool,
        cfg: PoolConfig,
        *,
        job: str | None = None,
        log: Callable[[str], None] = console,
    ) -> None:
        """job: the job's id (default: the one connect_pool joined); another id joins the workers now."""
        self.pool = pool
        self.cfg = cfg
        self.job = job or pool.job
        self.workers = JobWorkers.of(pool, self.job, placement_timeout_s=cfg.placement_timeout_s, log=log)
        if self.job != pool.job:
            self.workers.join_all()
        self.meta: ModelMeta = self.workers.call("model_meta")
        self.latent_channels = self.meta.latent_channels
        self.native_size = self.meta.native_size
        self.vae_scale_factor = self.meta.vae.scale_factor
        self._cond: Cond | None = None
        self._batch_cache: dict[tuple[int, ...], int] = {}
        self.dispatcher = Dispatcher(self.workers, max_batch=self.max_batch, max_in_flight=cfg.max_in_flight)
        self.vae_rounds = 0
        self.end_notes: list[dict] = []
        self.serving: StudentsServing | None = None

    def max_batch(self, shape: tuple[int, ...]) -> int:
        """The pool's batch size for views of `shape`: the configured one, else the smallest any worker
        can hold (so every worker can run every batch and batching never depends on placement)."""
        if self.cfg.max_batch:
            return self.cfg.max_batch
        if shape not in self._batch_cache:
            sizes = self.workers.call_ready("max_batch", shape)
            self._batch_cache[shape] = min(sizes) if sizes else self.workers.call("max_batch", shape)
        return self._batch_cache[shape]

    def serve_students(self, attention: AttentionConfig) -> tuple[str, ...]:
        """Route the job's forwards on every worker through the students of `attention`; the bundle
        is checked here first (a damaged one fails the job before any work). Returns the layers."""
        self.serving = StudentsServing.check(attention)
        answers = self.workers.serve_students(attention)
        self.serving.routed = tuple(answers[0]) if answers else ()
        return self.serving.routed

    def cond(self) -> Cond:
        if self._cond is None:
            self._cond = self.workers.call("make_cond")
            self.workers.set_cond(self._cond)
        return self._cond

    def evaluate(self, views: Sequence[ViewInput]) -> list[torch.Tensor]:
        self.cond()
        out = self.dispatcher.evaluate(views)
        if self.serving is not None:
            self.serving.note(self.dispatcher.stats.decisions)
        self.dispatcher.stats.decisions.clear()
        return out

    def encode(self, images: torch.Tensor, *, tile: int = 0) -> torch.Tensor:
        return self._vae("encode", images, tile)

    def decode(self, latents: torch.Tensor, *, tile: int = 0) -> torch.Tensor:
        return self._vae("decode", latents, tile)

    def _vae(self, op: VaeOp, tensor: torch.Tensor, tile: int) -> torch.Tensor:
        """One untiled pass on a ready worker, or a tiled pass over every ready worker."""
        if not tile:
            return self.workers.call(op, tensor)
        result = tiled_over_pool(self.workers, op, tensor, self.meta.vae, tile_px=tile)
        self.vae_rounds += result.rounds
        return result.output

    def close(self) -> None:
        """End the job on the workers (theirs only: other jobs on the pool keep their state)."""
        self.end_notes = self.workers.end()

    def fallbacks(self) -> list[dict]:
        """Every designed fallback of the pool as a job.json entry ({"what", "reason", ...})."""
        out = []
        if self.pool.plan is not None and self.pool.plan.cpu_fallback:
            out.append({"what": "pool on CPU", "reason": "; ".join(self.pool.plan.notes)})
        for s in self.dispatcher.stats.oom_splits:
            out.append(
                {
                    "what": "oom batch split",
                    "worker": s["worker"],
                    "batch_sizes": s["batch_sizes"],
                    "reason": f"worker {s['worker']}: batches of {s['batch_sizes']} views did not fit in "
                    "GPU memory and ran in halves",
                }
            )
        for r in self.dispatcher.stats.requeued:
            out.append(
                {
                    "what": "batch requeued",
                    "worker": r["worker"],
                    "batch": r["batch"],
                    "reason": f"worker {r['worker']} was lost ({r['error']}); batch {r['batch']} ran again",
                }
            )
        return out + self.workers.fallbacks

    def summary(self) -> dict:
        return {
            "worker_memory": self.workers.call_ready("memory", replace=False),
            **self.dispatcher.stats.summary(),
            "oom_fallbacks": self.dispatcher.stats.oom_splits,
            "requeued_batches": self.dispatcher.stats.requeued,
            "vae_reduction_rounds": self.vae_rounds,
            "workers": self.workers.infos(),
            "pool": {"name": self.pool.name, "size": self.pool.size, **self.pool.facts},
            "fallbacks": self.fallbacks(),
            "stopped_at_end": self.end_notes,
            **({"attention": self.serving.record(self.dispatcher.stats.attention)} if self.serving else {}),
        }
