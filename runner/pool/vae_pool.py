"""The Ray fan-out of a tiled VAE pass: the round loop is core/vae/lockstep.py's, run over workers.

Tile i lives on worker i * W // N (contiguous blocks, so a worker's tiles are neighbours). Each
round every worker advances its tile group by one step (`ModelWorker.vae_advance`); the driver's
loop reduces all tiles' requests in tile order and sends the one reply to every worker by reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import ray
import torch

from core.vae.lockstep import Advance, TiledResult, TileInput, VaeRound, run_tiled
from core.vae.tiled import Reply, VaeGeometry, VaeOp, plan_tiles


class PoolTiles:
    """A `core.vae.lockstep.Fanout` over Ray workers, for one job."""

    def __init__(self, workers: Sequence, job: str) -> None:
        if not workers:
            raise ValueError("a tiled VAE pass over the pool needs at least one worker")
        self.workers, self.job = list(workers), job

    def __call__(self, op: VaeOp, tiles: Sequence[TileInput]) -> Advance:
        n, k = len(tiles), len(self.workers)
        groups: dict[int, list[TileInput]] = {}
        for i, tile in enumerate(tiles):
            groups.setdefault(i * k // n, []).append(tile)
        active = [self.workers[w] for w in sorted(groups)]
        ray.get(
            [w.vae_start.remote(self.job, op, groups[i]) for w, i in zip(active, sorted(groups), strict=True)]
        )

        def advance(reply: Reply | None) -> list[VaeRound]:
            ref = ray.put(reply)
            return ray.get([w.vae_advance.remote(self.job, ref) for w in active])

        return advance


def tiled_over_pool(
    workers: Sequence, job: str, op: VaeOp, tensor: torch.Tensor, vae: VaeGeometry, *, tile_px: int
) -> TiledResult:
    """Encode images [B, 3, H, W] or decode latents [B, C, h, w] in tiles of tile_px image pixels."""
    return run_tiled(plan_tiles(op, tensor.shape, vae, tile_px=tile_px), tensor, PoolTiles(workers, job))
