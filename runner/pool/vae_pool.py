"""Tiled VAE passes spread over the pool, with exact GroupNorm statistics (core/vae/tiled.py).

Tile i lives on worker i * W // N (contiguous blocks, so a worker's tiles are neighbours). Every
worker runs its tiles' programs to their next reduction request; the driver reduces the requests of
all tiles in tile order (float64 sums, so the result does not depend on the placement) and sends
the one reply back to every worker. Rounds repeat until the programs return their output cores.
"""

from __future__ import annotations

import ray
import torch

from core.vae.tiled import reduce_requests, split_tiles, stitch


def tiled_over_pool(
    workers: list, job: str, op: str, tensor: torch.Tensor, meta: dict, *, tile_px: int
) -> tuple[torch.Tensor, int]:
    """Encode images [B, 3, H, W] or decode latents [B, C, h, w] tile by tile over `workers`.

    Returns (output, number of reduction rounds). tile_px: the tile side in image pixels.
    """
    if op not in ("encode", "decode"):
        raise ValueError(f"op must be encode or decode, got {op!r}")
    b, _, h, w = tensor.shape
    f = meta["vae_scale_factor"]
    if op == "encode":
        specs = split_tiles(h, w, tile=max(f, tile_px // f * f), pad=meta["encode_halo"], align=f)
        out_shape, scale = (b, meta["latent_channels"], h // f, w // f), 1 / f
    else:
        specs = split_tiles(h, w, tile=max(1, tile_px // f), pad=meta["decode_halo"], align=1)
        out_shape, scale = (b, 3, h * f, w * f), f
    n, k = len(specs), len(workers)
    assignment: dict[int, list] = {}
    for i, spec in enumerate(specs):
        window = spec.window.cut(tensor).contiguous()
        assignment.setdefault(i * k // n, []).append((i, window, spec.core_in_window))
    active = sorted(assignment)
    states = ray.get([workers[w].vae_start.remote(job, op, assignment[w]) for w in active])
    rounds = 0
    while True:
        kinds = {kind for kind, _ in states}
        if kinds == {"done"}:
            break
        if kinds != {"request"}:
            raise RuntimeError(f"tiled {op}: workers out of step ({sorted(kinds)})")
        requests = sorted((item for _, items in states for item in items), key=lambda t: t[0])
        reply = ray.put(reduce_requests([req for _, req in requests]))
        states = ray.get([workers[w].vae_send.remote(job, reply) for w in active])
        rounds += 1
    cores = sorted((item for _, items in states for item in items), key=lambda t: t[0])
    return stitch([c for _, c in cores], specs, out_shape, scale), rounds
