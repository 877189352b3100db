"""The one round loop of a tiled VAE pass (core/vae/tiled.py), with the fan-out injected.

Tiles are held in groups (all of them in this process, or a block of neighbours per worker). A
round advances every group by one step: each of its tile programs runs to its next reduction request
(a `VaeRound` of requests), or returns its output core (a `VaeRound` of outputs). The loop reduces
the requests of all tiles in tile order (float64 sums, so the reply does not depend on how tiles
are grouped or placed), hands the one reply to every group, and repeats until all programs have
returned. Then the cores are stitched.

`run_tiled(plan, tensor, fanout)` takes the fan-out: `fanout(op, tiles)` starts the tiles' programs
wherever they will run and returns `advance(reply) -> [VaeRound per group]` (reply None: the first
step). `in_process(vae)` holds them here; runner/pool/vae_pool.py holds them on Ray workers. The
same loop, the same reductions and the same stitching run either way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from core.tiling.rect import Rect
from core.vae.tiled import (
    Reply,
    Request,
    TiledVae,
    TilePlan,
    TileProgram,
    VaeGeometry,
    VaeOp,
    move,
    plan_tiles,
    reduce_requests,
    stitch,
)


@dataclass(frozen=True, eq=False)
class TileInput:
    """What starts one tile's program: its index in the plan, its input window, its core in the window."""

    index: int
    window: torch.Tensor
    core: Rect


@dataclass(frozen=True, eq=False)
class VaeRound:
    """A group of tiles after one step: each tile's next request, or, once the programs have
    returned, each tile's output core; in the order of `tiles` (plan indices)."""

    tiles: tuple[int, ...]
    requests: tuple[Request, ...] = ()
    outputs: tuple[torch.Tensor, ...] = ()

    @property
    def done(self) -> bool:
        return bool(self.outputs)

    def to(self, device: torch.device | str) -> VaeRound:
        return VaeRound(
            self.tiles,
            tuple(move(r, device) for r in self.requests),
            tuple(o.to(device) for o in self.outputs),
        )


Advance = Callable[[Reply | None], Sequence[VaeRound]]
Fanout = Callable[[VaeOp, Sequence[TileInput]], Advance]


class TileGroup:
    """Tile programs held by one process and advanced together, one step per `advance`."""

    def __init__(self, tiles: Sequence[int], programs: Sequence[TileProgram]) -> None:
        if len(tiles) != len(programs) or not programs:
            raise ValueError(f"a tile group needs one program per tile, got {len(tiles)} and {len(programs)}")
        self.tiles, self.programs = tuple(tiles), list(programs)

    @classmethod
    def start(cls, vae: TiledVae, op: VaeOp, inputs: Sequence[TileInput]) -> TileGroup:
        make = vae.encode_program if op == "encode" else vae.decode_program
        return cls([t.index for t in inputs], [make(t.window, t.core) for t in inputs])

    def advance(self, reply: Reply | None) -> VaeRound:
        """Send `reply` to every program (None starts them) and collect what they yield or return."""
        requests, outputs = [], []
        with torch.no_grad():
            for program in self.programs:
                try:
                    requests.append(program.send(reply))  # type: ignore[arg-type]
                except StopIteration as stop:
                    outputs.append(stop.value)
        if requests and outputs:
            raise RuntimeError(
                f"tile programs out of step: {len(outputs)} of tiles {list(self.tiles)} returned while "
                "others still yield"
            )
        return VaeRound(self.tiles, tuple(requests), tuple(outputs))


def run_lockstep(advance: Advance) -> tuple[list[torch.Tensor], int]:
    """Advance every group round by round; (output cores in tile order, reduction rounds)."""
    groups = advance(None)
    rounds = 0
    while not all(g.done for g in groups):
        if any(g.done for g in groups):
            finished = [t for g in groups if g.done for t in g.tiles]
            raise RuntimeError(
                f"tile programs out of step: tiles {finished} returned while others still yield"
            )
        requests = sorted((t, r) for g in groups for t, r in zip(g.tiles, g.requests, strict=True))
        groups = advance(reduce_requests([r for _, r in requests]))
        rounds += 1
    cores = sorted((t, o) for g in groups for t, o in zip(g.tiles, g.outputs, strict=True))
    return [o for _, o in cores], rounds


@dataclass(frozen=True, eq=False)
class TiledResult:
    output: torch.Tensor
    rounds: int  # reduction rounds (GroupNorms and attentions of the pass)


def run_tiled(plan: TilePlan, tensor: torch.Tensor, fanout: Fanout) -> TiledResult:
    """One tiled pass of `plan` over `tensor`, its tile programs run where `fanout` puts them."""
    inputs = [
        TileInput(i, s.window.cut(tensor).contiguous(), s.core_in_window) for i, s in enumerate(plan.specs)
    ]
    cores, rounds = run_lockstep(fanout(plan.op, inputs))
    return TiledResult(stitch(cores, plan.specs, plan.out_shape, plan.scale), rounds)


def in_process(vae: TiledVae) -> Fanout:
    """The fan-out that holds every tile here, as one group."""

    def fanout(op: VaeOp, inputs: Sequence[TileInput]) -> Advance:
        group = TileGroup.start(vae, op, inputs)
        return lambda reply: [group.advance(reply)]

    return fanout


def tiled_encode(
    vae: TiledVae, images: torch.Tensor, *, tile: int = 512, pad: int | None = None
) -> torch.Tensor:
    """Encode images [B, 3, H, W] in [0, 1] in tiles of `tile` image pixels, in this process."""
    plan = plan_tiles("encode", images.shape, VaeGeometry.of(vae), tile_px=tile, pad=pad)
    return run_tiled(plan, images, in_process(vae)).output


def tiled_decode(
    vae: TiledVae, latents: torch.Tensor, *, tile: int = 512, pad: int | None = None
) -> torch.Tensor:
    """Decode latents [B, C, h, w] in tiles of `tile` image pixels (tile / f latent pixels), here."""
    plan = plan_tiles("decode", latents.shape, VaeGeometry.of(vae), tile_px=tile, pad=pad)
    return run_tiled(plan, latents, in_process(vae)).output
