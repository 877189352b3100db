"""The Ray side of `tasks.context.ModelPool`: views through the dispatcher, conditioning computed
once and broadcast by reference, and the VAE (tiled passes spread over every worker)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import ray
import torch

from core.models.backbone import Cond
from core.models.loading import ModelMeta
from core.tiling.views import ViewInput
from core.vae.tiled import VaeOp
from runner.config import PoolConfig
from runner.pool.dispatch import Dispatcher
from runner.pool.pool import WorkerPool
from runner.pool.vae_pool import tiled_over_pool


class RayModelPool:
    def __init__(self, pool: WorkerPool, cfg: PoolConfig, *, job: str | None = None) -> None:
        self.pool = pool
        self.cfg = cfg
        self.job = job or uuid.uuid4().hex[:12]
        self.meta: ModelMeta = ray.get(pool.workers[0].model_meta.remote())
        self.latent_channels = self.meta.latent_channels
        self.native_size = self.meta.native_size
        self.vae_scale_factor = self.meta.vae.scale_factor
        self._cond: Cond | None = None
        self._batch_cache: dict[tuple[int, ...], int] = {}
        self.dispatcher = Dispatcher(
            pool.workers, self.job, max_batch=self.max_batch, max_in_flight=cfg.max_in_flight
        )
        self.vae_rounds = 0

    def max_batch(self, shape: tuple[int, ...]) -> int:
        """The pool's batch size for views of `shape`: the configured one, else the smallest any worker
        can hold (so every worker can run every batch and batching never depends on placement)."""
        if self.cfg.max_batch:
            return self.cfg.max_batch
        if shape not in self._batch_cache:
            self._batch_cache[shape] = min(ray.get([w.max_batch.remote(shape) for w in self.pool.workers]))
        return self._batch_cache[shape]

    def cond(self) -> Cond:
        if self._cond is None:
            self._cond = ray.get(self.pool.workers[0].make_cond.remote())
            ref = ray.put(self._cond)
            ray.get([w.set_cond.remote(self.job, ref) for w in self.pool.workers])
        return self._cond

    def evaluate(self, views: Sequence[ViewInput]) -> list[torch.Tensor]:
        self.cond()
        return self.dispatcher.evaluate(views)

    def encode(self, images: torch.Tensor, *, tile: int = 0) -> torch.Tensor:
        return self._vae("encode", images, tile)

    def decode(self, latents: torch.Tensor, *, tile: int = 0) -> torch.Tensor:
        return self._vae("decode", latents, tile)

    def _vae(self, op: VaeOp, tensor: torch.Tensor, tile: int) -> torch.Tensor:
        """One untiled pass on the first worker, or a tiled pass over every worker."""
        if not tile:
            worker = self.pool.workers[0]
            return ray.get((worker.encode if op == "encode" else worker.decode).remote(tensor))
        result = tiled_over_pool(self.pool.workers, self.job, op, tensor, self.meta.vae, tile_px=tile)
        self.vae_rounds += result.rounds
        return result.output

    def close(self) -> None:
        ray.get([w.end_job.remote(self.job) for w in self.pool.workers])

    def summary(self) -> dict:
        memory = ray.get([w.memory.remote() for w in self.pool.workers])
        return {
            "worker_memory": memory,
            **self.dispatcher.stats.summary(),
            "oom_fallbacks": self.dispatcher.stats.oom_splits,
            "requeued_batches": self.dispatcher.stats.requeued,
            "vae_reduction_rounds": self.vae_rounds,
            "workers": self.pool.infos,
            "pool": {"name": self.pool.name, "size": self.pool.size, "created": self.pool.created},
        }
