"""Byte budgets of the replay tiers, and the order in which room is made.

Two tiers, RAM then disk, each with a budget in bytes (0 = the tier is off; at least one is on).
A capture is written to the first tier that is on. When it does not fit, room is made one step at a
time, and each step keeps every tier within its budget at every moment:

  1. a quarantined file in the first tier is deleted (damaged captures go before good ones);
  2. else the oldest committed capture of the first tier is spilled to the next tier, after that
     tier has made room for it the same way (its quarantined files first, then its oldest);
  3. in the last tier, the oldest committed capture is evicted.

"Oldest" is the smallest insertion order, across all layers. Captures always enter the first tier
and leave it oldest-first, so every capture on disk is older than every capture in RAM and the two
tiers together are one FIFO; the only exception is a capture whose write was still in flight when
its neighbours spilled (it cannot move until committed, and spills after them).

The budget counts every byte of the tier's files: committed captures, quarantined ones and the
reservations of writes in flight. A write in flight cannot be moved, so an insert that only fits
once those writes end waits (`Blocked`), and a capture larger than any budget that is on is an
error when it is offered, not a stall.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

Tier = Literal["ram", "disk"]
TIERS: tuple[Tier, ...] = ("ram", "disk")
ActionKind = Literal["spill", "evict", "discard"]


class CaptureTooLarge(ValueError):
    """A capture larger than a tier's whole budget: it could never be stored."""


@dataclass(frozen=True)
class RoomAction:
    """One step of making room, for the runner to carry out (then `apply`).

    spill: move capture `order` from `tier` ("ram") to the next tier; evict: delete a committed
    capture (oldest of the last tier); discard: delete a quarantined file of `tier`."""

    kind: ActionKind
    order: int
    tier: Tier
    nbytes: int


@dataclass(kw_only=True)
class TierLedger:
    """What one tier holds, in bytes: committed captures (sorted by order), quarantined ones and
    reservations in flight."""

    name: Tier
    budget: int
    ready: list[int] = field(default_factory=list)  # orders, ascending
    quarantined: list[int] = field(default_factory=list)  # orders, ascending
    ready_bytes: int = 0
    quarantined_bytes: int = 0
    pending_bytes: int = 0

    @property
    def on(self) -> bool:
        return self.budget > 0

    @property
    def used(self) -> int:
        return self.ready_bytes + self.quarantined_bytes + self.pending_bytes

    @property
    def free(self) -> int:
        return self.budget - self.used

    def add_ready(self, order: int, nbytes: int) -> None:
        insort(self.ready, order)
        self.ready_bytes += nbytes

    def remove_ready(self, order: int, nbytes: int) -> None:
        remove_sorted(self.ready, order)
        self.ready_bytes -= nbytes

    def add_quarantined(self, order: int, nbytes: int) -> None:
        insort(self.quarantined, order)
        self.quarantined_bytes += nbytes

    def remove_quarantined(self, order: int, nbytes: int) -> None:
        remove_sorted(self.quarantined, order)
        self.quarantined_bytes -= nbytes


def next_room_action(tiers: list[TierLedger], need: int, size_of: Callable[[int], int]) -> RoomAction | None:
    """The next step that makes room for `need` bytes in the first tier that is on, or None when it
    fits. `tiers` are the ledgers that are on, in order; `size_of(order)` is a capture's bytes.
    The caller has checked feasibility (`can_make_room`), so a step always exists."""
    if tiers[0].free >= need:
        return None
    return _room_step(tiers, 0, need, size_of)


def _room_step(tiers: list[TierLedger], i: int, need: int, size_of: Callable[[int], int]) -> RoomAction:
    tier = tiers[i]
    if tier.quarantined:
        q = tier.quarantined[0]
        return RoomAction("discard", q, tier.name, size_of(q))
    if not tier.ready:
        raise RuntimeError(
            f"{tier.name} tier: no committed capture to move for {need} bytes (infeasible plan)"
        )
    oldest = tier.ready[0]
    if i == len(tiers) - 1:
        return RoomAction("evict", oldest, tier.name, size_of(oldest))
    if tiers[i + 1].free >= size_of(oldest):
        return RoomAction("spill", oldest, tier.name, size_of(oldest))
    return _room_step(tiers, i + 1, size_of(oldest), size_of)


def can_make_room(tiers: list[TierLedger], need: int) -> bool:
    """Whether moving committed and quarantined captures can free `need` bytes in the first tier:
    only its writes in flight are immovable. (Later tiers hold no writes in flight, and every
    capture fits every budget, so a spill can always make room where it lands.)"""
    return tiers[0].budget - tiers[0].pending_bytes >= need


# Sorted lists of insertion orders (the ledgers' and the policy's per-layer lists).
def insort(xs: list[int], x: int) -> None:
    bisect.insort(xs, x)


def contains(xs: list[int], x: int) -> bool:
    i = bisect.bisect_left(xs, x)
    return i < len(xs) and xs[i] == x


def remove_sorted(xs: list[int], x: int) -> None:
    i = bisect.bisect_left(xs, x)
    if i == len(xs) or xs[i] != x:
        raise KeyError(f"order {x} is not listed")
    del xs[i]
