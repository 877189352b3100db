"""The progressive phase plan: sizes after each phase's resize, and per-phase seeds (docs/upscale.md).

`plan_phase_sizes` takes any target size and aspect ratio. Each axis scales geometrically by
(target / src)^(1/S) per phase; intermediate sizes round half up to a multiple of `align`; the last
phase is the target rounded UP to `align`, so the final size never drifts below the target (the
task resizes the decoded image to the exact target when `needs_final_resize` says so). The
FlowMatching-Upscaler instead scales the current size by total^(1/S) per stage and rounds to even,
so its final size drifts from base x total; that form is not offered.

Seeds follow the Upscaler's golden-ratio stride (`core.flow.seeds.stage_seed`): phase i gets
stage_seed(seed, i), the clean-up phase the next one, and next_seed (recorded in job.json, for a
job chained after this one) the one after the last used.

Decisions: a target smaller than the source on either axis is an error (this is an upscaler; a
downscale is a plain resize); a target equal to the source is allowed and plans one phase (a
clean-up style pass). `max_scale` picks S only when `phases` is None; an explicit phase count is
the user's choice and is not checked against it. S is chosen on the exact target, so rounding to
`align` can move a phase's actual factor by at most align/2 pixels either way.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from core.flow.seeds import stage_seed


class PhaseSize(NamedTuple):
    """A size in pixels (height, width)."""

    height: int
    width: int


def _round_to(value: float, align: int) -> int:
    """Round half up to a multiple of align, at least align."""
    return max(align, math.floor(value / align + 0.5) * align)


def _ceil_to(value: int, align: int) -> int:
    return max(align, -(-value // align) * align)


def phase_count(src: tuple[int, int], target: tuple[int, int], max_scale: float) -> int:
    """The fewest phases S >= 1 such that (target / src)^(1/S) <= max_scale on both axes."""
    if not max_scale > 1.0:
        raise ValueError(f"max_scale must be > 1, got {max_scale}")
    ratio = max(target[0] / src[0], target[1] / src[1])
    if ratio <= 1.0:
        return 1
    # The 1e-9 keeps exact powers (4 = 2^2) from rounding up to an extra phase.
    return max(1, math.ceil(math.log(ratio) / math.log(max_scale) - 1e-9))


def plan_phase_sizes(
    src: tuple[int, int],
    target: tuple[int, int],
    *,
    max_scale: float = 2.0,
    phases: int | None = None,
    align: int = 16,
) -> list[PhaseSize]:
    """Sizes (height, width) in pixels after each phase's resize, one per phase, last = target aligned up.

    Phase i (1-based, i < S) is round_half_up(src * ((target / src)^(1/S))^i) per axis, to a
    multiple of `align`; phase S is the target rounded up to a multiple of `align`.
    """
    (sh, sw), (th, tw) = src, target
    if min(sh, sw, th, tw) < 1:
        raise ValueError(f"sizes must be >= 1 pixel, got src {src} and target {target}")
    if th < sh or tw < sw:
        raise ValueError(f"target {target} is smaller than the source {src} on an axis; upscale only")
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    if phases is None:
        phases = phase_count(src, target, max_scale)
    elif phases < 1:
        raise ValueError(f"phases must be >= 1, got {phases}")
    fh, fw = (th / sh) ** (1.0 / phases), (tw / sw) ** (1.0 / phases)
    sizes = [PhaseSize(_round_to(sh * fh**i, align), _round_to(sw * fw**i, align)) for i in range(1, phases)]
    sizes.append(PhaseSize(_ceil_to(th, align), _ceil_to(tw, align)))
    return sizes


def needs_final_resize(target: tuple[int, int], last: tuple[int, int]) -> bool:
    """True when the last phase's (aligned) size differs from the exact target."""
    return (int(last[0]), int(last[1])) != (int(target[0]), int(target[1]))


def phase_seeds(seed: int, phases: int) -> list[int]:
    """Per-phase seeds on the golden stride: stage_seed(seed, i) for i = 0..phases-1."""
    if phases < 1:
        raise ValueError(f"phases must be >= 1, got {phases}")
    return [stage_seed(seed, i) for i in range(phases)]


def cleanup_seed(seed: int, phases: int) -> int:
    """The clean-up phase's seed: the next on the stride after the last phase."""
    return stage_seed(seed, phases)


def next_seed(seed: int, phases: int, *, cleanup: bool) -> int:
    """The Upscaler's next_seed output: the last seed used plus one stride."""
    return stage_seed(seed, phases + (1 if cleanup else 0))
