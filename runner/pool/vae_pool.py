"""The Ray fan-out of a tiled VAE pass: the round loop is core/vae/lockstep.py's, run over workers.

Tile i lives on worker i * W // N of the W ready workers (contiguous blocks, so a worker's tiles
are neighbours). Each round every worker advances its tile group by one step
(`ModelWorker.vae_advance`); the driver's loop reduces all tiles' requests in tile order and sends
the one reply to every worker by reference.

A worker lost mid-pass takes its tile programs with it, so the pass starts again from its first
round on the workers ready then (the lost one's replacement, once it has the job's state, or the
others). The reductions are float64 sums in tile order and every tile runs its own program, so the
result does not depend on how the tiles are grouped: the restarted pass is exact. A pass that loses
a worker twice raises, as a batch does (the pass may be what kills them).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import ray
import torch

from core.vae.lockstep import Advance, TiledResult, TileInput, VaeRound, run_tiled
from core.vae.tiled import Reply, VaeGeometry, VaeOp, plan_tiles
from runner.pool.job_workers import LOST, JobWorkers
from runner.pool.worker import JobNotReadyError


class PassLost(RuntimeError):
    """A worker of the pass was lost (recorded on the JobWorkers); the pass must start again."""


class PoolTiles:
    """A `core.vae.lockstep.Fanout` over the job's ready workers, for one attempt at one pass."""

    def __init__(self, workers: JobWorkers) -> None:
        self.workers = workers
        self.pass_id = uuid.uuid4().hex[:8]
        self.active: list[tuple[int, object]] = []  # (worker index, handle) holding tiles

    def __call__(self, op: VaeOp, tiles: Sequence[TileInput]) -> Advance:
        ready = self.workers.ready()
        n, k = len(tiles), len(ready)
        groups: dict[int, list[TileInput]] = {}
        for i, tile in enumerate(tiles):
            groups.setdefault(ready[i * k // n], []).append(tile)
        self.active = [(w, self.workers.handle(w)) for w in sorted(groups)]
        job = self.workers.job
        self._gather([h.vae_start.remote(job, self.pass_id, op, groups[w]) for w, h in self.active])

        def advance(reply: Reply | None) -> list[VaeRound]:
            ref = ray.put(reply)
            return self._gather([h.vae_advance.remote(job, self.pass_id, ref) for _, h in self.active])

        return advance

    def _gather(self, refs: list) -> list:
        """Every call's result, in order; PassLost once all have settled if any worker was lost (so
        no call of this attempt still runs when the pass starts again)."""
        ray.wait(refs, num_returns=len(refs))
        results, lost = [], False
        for (w, handle), ref in zip(self.active, refs, strict=True):
            try:
                results.append(ray.get(ref))
            except (*LOST, JobNotReadyError) as err:
                self.workers.lost(w, handle, err)
                lost = True
        if lost:
            raise PassLost(f"tiled VAE pass {self.pass_id} lost a worker")
        return results


def tiled_over_pool(
    workers: JobWorkers, op: VaeOp, tensor: torch.Tensor, vae: VaeGeometry, *, tile_px: int
) -> TiledResult:
    """Encode images [B, 3, H, W] or decode latents [B, C, h, w] in tiles of tile_px image pixels."""
    plan = plan_tiles(op, tensor.shape, vae, tile_px=tile_px)
    for attempt in (1, 2):
        workers.poll()
        workers.wait_ready()
        try:
            return run_tiled(plan, tensor, PoolTiles(workers))
        except PassLost as err:
            if attempt == 2:
                raise RuntimeError(f"a tiled VAE {op} lost a worker twice; giving up") from err
            entry = {
                "what": "tiled VAE pass restarted",
                "op": op,
                "reason": f"a worker was lost during a tiled VAE {op}; the pass ran again from its "
                "first round on the workers ready then",
            }
            workers.fallbacks.append(entry)
            workers.log(f"[fallback] {entry['what']}: {entry['reason']}")
    raise AssertionError("unreachable")
