"""The replay store's decisions, without its files: admission, room-making, sampling, reuse and rate
limits, the validation split, and the state that makes a resumed store exact.

Design decisions:
- Captures are identified by their insertion order (0, 1, 2, ... across all layers), which is also
  their age: eviction takes the smallest order (see `tiers`).
- Training samples are uniform over a layer's eligible captures (committed, training split, sampled
  fewer than `reuse_cap` times), without replacement inside one call. Draws are a pure function of
  (seed, layer, draw counter) (SplitMix64 through `core.flow.seeds.derive_seed`), so a layer's
  sequence never depends on how calls for other layers interleave with it, and the state is a few
  counters.
- A capture that reaches the reuse cap is retired: it stops being sampled (Reverb's
  max_times_sampled) and counts as a delete for the rate limiter, but its file stays until the
  budget evicts it oldest-first, so a consumer that was just handed it can still read it.
- One `RatioLimiter` per layer: each layer has its own trainer, so each layer is its own table.
- The validation split is decided at insert by a seeded low-discrepancy rule: the n-th capture of a
  layer (n = 0, 1, ...) is held out iff floor((n + 1) f + phi) > floor(n f + phi), phi in [0, 1)
  drawn from (seed, layer). Exactly floor(n f + phi) of the first n captures are held out (within
  one of n f at every n), evenly spread. Held-out captures are never sampled for training, do not
  count for the rate limiter, and are evicted by age like the rest.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

from core.distill.ratio_limiter import RatioLimiter, RatioLimiterConfig
from core.distill.tiers import (
    TIERS,
    CaptureTooLarge,
    RoomAction,
    Tier,
    TierLedger,
    can_make_room,
    contains,
    insort,
    next_room_action,
    remove_sorted,
)
from core.flow.seeds import derive_seed

Split = Literal["train", "val"]
EntryState = Literal["pending", "ready", "quarantined"]
BlockReason = Literal["rate_limited", "writes_in_flight", "below_min_size", "too_few_eligible"]
STATE_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class ReplayPolicyConfig:
    """ram_bytes, disk_bytes: tier budgets (0 = tier off); reuse_cap: samples per capture before it is
    retired (0 = no cap); limiter: the per-layer sample-to-insert ratio; validation_fraction: share
    of each layer's captures held out; seed: the sampler's and the split's seed."""

    ram_bytes: int
    disk_bytes: int
    reuse_cap: int = 0
    limiter: RatioLimiterConfig = field(default_factory=RatioLimiterConfig)
    validation_fraction: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.ram_bytes < 0 or self.disk_bytes < 0 or self.ram_bytes + self.disk_bytes == 0:
            raise ValueError(
                f"replay budgets must be >= 0 with at least one > 0, got ram_bytes={self.ram_bytes}, "
                f"disk_bytes={self.disk_bytes}"
            )
        if self.reuse_cap < 0:
            raise ValueError(f"reuse_cap must be >= 0 (0 = no cap), got {self.reuse_cap}")
        if self.reuse_cap and self.reuse_cap < self.limiter.samples_per_insert:
            raise ValueError(
                f"reuse_cap {self.reuse_cap} is below limiter.samples_per_insert "
                f"{self.limiter.samples_per_insert}: the ratio could never be reached"
            )
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")

    def budget(self, tier: Tier) -> int:
        return self.ram_bytes if tier == "ram" else self.disk_bytes


@dataclass(kw_only=True)
class ReplayEntry:
    """The policy's view of one capture."""

    order: int
    layer: str
    nbytes: int
    tier: Tier
    split: Split
    state: EntryState = "pending"
    times_sampled: int = 0


@dataclass(frozen=True)
class Blocked:
    """The call cannot proceed now; retry after the other side has moved (or a write has ended)."""

    reason: BlockReason


@dataclass(frozen=True)
class Reservation:
    """An admitted insert: write `nbytes` for capture `order` into `tier`, then commit or abort."""

    order: int
    layer: str
    split: Split
    tier: Tier
    nbytes: int


@dataclass(kw_only=True)
class _Layer:
    limiter: RatioLimiter
    inserted: int = 0  # reservations so far (the split rule's n)
    train_draws: int = 0
    val_draws: int = 0
    eligible: list[int] = field(default_factory=list)  # training captures still sampleable, ascending
    val: list[int] = field(default_factory=list)  # held-out captures, ascending


class ReplayPolicy:
    """Admission, room-making and sampling over an index of `ReplayEntry`s.

    Insert protocol (the runner carries out the file work between the calls):
        verdict = check_insert(layer, nbytes)          # Blocked, or the split it would get
        while (a := next_room_action(nbytes)): do it, then apply(a)
        r = reserve(layer, nbytes); write the file; commit(r.order) or abort(r.order)
    """

    def __init__(self, cfg: ReplayPolicyConfig) -> None:
        self.cfg = cfg
        self._reset()

    def _reset(self) -> None:
        self.entries: dict[int, ReplayEntry] = {}
        self.ledgers = {t: TierLedger(name=t, budget=self.cfg.budget(t)) for t in TIERS}
        self.layers: dict[str, _Layer] = {}
        self.next_order = 0

    # ---- insertion --------------------------------------------------------------------------
    @property
    def _on(self) -> list[TierLedger]:
        return [ledger for ledger in self.ledgers.values() if ledger.on]

    def check_insert(self, layer: str, nbytes: int) -> Split | Blocked:
        """The split the next capture of `layer` gets, or why it must wait. Raises CaptureTooLarge."""
        for ledger in self._on:
            if nbytes > ledger.budget:
                raise CaptureTooLarge(
                    f"a {nbytes}-byte capture of layer {layer!r} exceeds the {ledger.name} tier's whole "
                    f"budget of {ledger.budget} bytes"
                )
        state = self._layer(layer)
        split = self._split(layer, state.inserted)
        if split == "train" and not state.limiter.can_insert():
            return Blocked("rate_limited")
        if not can_make_room(self._on, nbytes):
            return Blocked("writes_in_flight")
        return split

    def next_room_action(self, nbytes: int) -> RoomAction | None:
        """The next spill, eviction or discard that makes room for an insert of `nbytes`, or None."""
        return next_room_action(self._on, nbytes, lambda order: self.entries[order].nbytes)

    def apply(self, action: RoomAction) -> None:
        """Record a step the runner has carried out."""
        e = self.entries[action.order]
        if action.kind == "discard":
            self.ledgers[e.tier].remove_quarantined(e.order, e.nbytes)
            del self.entries[e.order]
        elif action.kind == "evict":
            self._drop(e)
        else:
            self.ledgers[e.tier].remove_ready(e.order, e.nbytes)
            e.tier = "disk"
            self.ledgers["disk"].add_ready(e.order, e.nbytes)

    def insert_tier(self) -> Tier:
        """The tier new captures are written to (RAM, unless its budget is 0)."""
        return self._on[0].name

    def reserve(self, layer: str, nbytes: int) -> Reservation:
        split = self.check_insert(layer, nbytes)
        if isinstance(split, Blocked):
            raise RuntimeError(f"reserve called while the insert is blocked ({split.reason})")
        first = self._on[0]
        if first.free < nbytes:
            raise RuntimeError(
                f"reserve called before making room: {first.name} has {first.free} of {nbytes} bytes"
            )
        state = self.layers[layer]
        state.inserted += 1
        if split == "train":
            state.limiter.admit()
        order = self.next_order
        self.next_order += 1
        self.entries[order] = ReplayEntry(
            order=order, layer=layer, nbytes=nbytes, tier=first.name, split=split
        )
        first.pending_bytes += nbytes
        return Reservation(order, layer, split, first.name, nbytes)

    def commit(self, order: int) -> None:
        e = self._pending(order)
        self.ledgers[e.tier].pending_bytes -= e.nbytes
        e.state = "ready"
        self.ledgers[e.tier].add_ready(order, e.nbytes)
        state = self.layers[e.layer]
        if e.split == "train":
            state.limiter.commit()
            insort(state.eligible, order)
        else:
            insort(state.val, order)

    def abort(self, order: int) -> None:
        e = self._pending(order)
        self.ledgers[e.tier].pending_bytes -= e.nbytes
        if e.split == "train":
            self.layers[e.layer].limiter.abort()
        del self.entries[order]

    def _pending(self, order: int) -> ReplayEntry:
        e = self.entries.get(order)
        if e is None or e.state != "pending":
            raise KeyError(f"capture {order} is not an insert in flight")
        return e

    # ---- sampling ---------------------------------------------------------------------------
    def sample(self, layer: str, n: int = 1) -> list[int] | Blocked:
        """n distinct training captures of `layer`, uniform; counts toward reuse and the limiter."""
        if n < 1:
            raise ValueError(f"sample n must be >= 1, got {n}")
        state = self._layer(layer)
        if state.limiter.size < state.limiter.cfg.min_size:
            return Blocked("below_min_size")
        if not state.limiter.can_sample(n):
            return Blocked("rate_limited")
        if len(state.eligible) < n:
            return Blocked("too_few_eligible")
        chosen = []
        pool = list(state.eligible)
        for _ in range(n):
            i = _draw_index(self.cfg.seed, "train", layer, state.train_draws, len(pool))
            state.train_draws += 1
            chosen.append(pool.pop(i))
        state.limiter.sampled(n)
        for order in chosen:
            e = self.entries[order]
            e.times_sampled += 1
            if self.cfg.reuse_cap and e.times_sampled >= self.cfg.reuse_cap:
                remove_sorted(state.eligible, order)
                state.limiter.deleted()
        return chosen

    def sample_validation(self, layer: str, n: int) -> list[int]:
        """Up to n distinct held-out captures of `layer`, uniform; never rate-limited or capped."""
        state = self._layer(layer)
        pool = list(state.val)
        chosen = []
        for _ in range(min(n, len(pool))):
            i = _draw_index(self.cfg.seed, "val", layer, state.val_draws, len(pool))
            state.val_draws += 1
            chosen.append(pool.pop(i))
        return chosen

    # ---- removal ----------------------------------------------------------------------------
    def quarantine(self, order: int) -> None:
        """A damaged capture: never served again; its bytes stay counted until its file is discarded."""
        e = self.entries[order]
        if e.state != "ready":
            raise KeyError(f"capture {order} is {e.state}, only committed captures can be quarantined")
        self._unlist(e)
        self.ledgers[e.tier].remove_ready(order, e.nbytes)
        e.state = "quarantined"
        self.ledgers[e.tier].add_quarantined(order, e.nbytes)

    def forget(self, order: int) -> None:
        """A capture whose file is gone (found missing on resume): drop it and its bytes."""
        e = self.entries[order]
        if e.state == "quarantined":
            self.ledgers[e.tier].remove_quarantined(order, e.nbytes)
            del self.entries[order]
        else:
            self._drop(e)

    def clear_layer(self, layer: str) -> list[ReplayEntry]:
        """Drop every committed capture of `layer`, training and held out (an OOM ladder clears the
        layer's buffer): the entries dropped, whose files the runner deletes. Inserts in flight and
        quarantined captures are left to their own paths; the layer's draw and split counters go on,
        so what it gets next is still a function of its own history."""
        gone = [e for e in self.entries.values() if e.layer == layer and e.state == "ready"]
        for e in gone:
            self._drop(e)
        return gone

    def _drop(self, e: ReplayEntry) -> None:
        self._unlist(e)
        self.ledgers[e.tier].remove_ready(e.order, e.nbytes)
        del self.entries[e.order]

    def _unlist(self, e: ReplayEntry) -> None:
        state = self.layers[e.layer]
        if e.split == "val":
            remove_sorted(state.val, e.order)
        elif contains(state.eligible, e.order):
            remove_sorted(state.eligible, e.order)
            state.limiter.deleted()

    # ---- helpers ----------------------------------------------------------------------------
    def _layer(self, layer: str) -> _Layer:
        if layer not in self.layers:
            self.layers[layer] = _Layer(limiter=RatioLimiter(cfg=self.cfg.limiter))
        return self.layers[layer]

    def _split(self, layer: str, n: int) -> Split:
        f = self.cfg.validation_fraction
        if f == 0:
            return "train"
        phi = derive_seed(self.cfg.seed, "replay-split", layer) / 2.0**64
        return "val" if math.floor((n + 1) * f + phi) > math.floor(n * f + phi) else "train"

    def used(self, tier: Tier) -> int:
        return self.ledgers[tier].used

    def summary(self) -> dict:
        return {
            "captures": sum(e.state == "ready" for e in self.entries.values()),
            "in_flight": sum(e.state == "pending" for e in self.entries.values()),
            "quarantined": sum(e.state == "quarantined" for e in self.entries.values()),
            "tiers": {
                t: {"budget": lg.budget, "used": lg.used, "captures": len(lg.ready)}
                for t, lg in self.ledgers.items()
            },
            "layers": {
                name: {"eligible": len(s.eligible), "validation": len(s.val), **s.limiter.describe()}
                for name, s in sorted(self.layers.items())
            },
        }

    # ---- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The index, the counters and the draw positions. Inserts in flight are left out: a resumed
        store has none, and their files are the runner's to delete."""
        return {
            "version": STATE_VERSION,
            "seed": self.cfg.seed,
            "next_order": self.next_order,
            "entries": [asdict(e) for e in self.entries.values() if e.state != "pending"],
            "layers": {
                name: {
                    "inserted": s.inserted,
                    "train_draws": s.train_draws,
                    "val_draws": s.val_draws,
                    "limiter": s.limiter.state_dict(),
                }
                for name, s in self.layers.items()
            },
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"replay state version {state.get('version')!r}, expected {STATE_VERSION}")
        if state["seed"] != self.cfg.seed:
            raise ValueError(
                f"replay state was saved with seed {state['seed']}, the config has {self.cfg.seed}"
            )
        self._reset()
        self.next_order = state["next_order"]
        for name, s in state["layers"].items():
            layer = self._layer(name)
            layer.inserted, layer.train_draws, layer.val_draws = (
                s["inserted"],
                s["train_draws"],
                s["val_draws"],
            )
            layer.limiter.load_state_dict(s["limiter"])
        for row in sorted(state["entries"], key=lambda r: r["order"]):
            e = ReplayEntry(**row)
            self.entries[e.order] = e
            ledger = self.ledgers[e.tier]
            if e.state == "quarantined":
                ledger.add_quarantined(e.order, e.nbytes)
                continue
            ledger.add_ready(e.order, e.nbytes)
            layer = self._layer(e.layer)
            if e.split == "val":
                layer.val.append(e.order)
            elif not (self.cfg.reuse_cap and e.times_sampled >= self.cfg.reuse_cap):
                layer.eligible.append(e.order)
        for ledger in self.ledgers.values():
            if ledger.used > ledger.budget:
                raise ValueError(
                    f"the replay state holds {ledger.used} bytes in the {ledger.name} tier, over its budget "
                    f"of {ledger.budget} bytes"
                )


def _draw_index(seed: int, purpose: str, layer: str, counter: int, n: int) -> int:
    """A uniform index in [0, n) from (seed, purpose, layer, counter): the top bits of a 64-bit hash
    times n (Lemire's multiply-shift; the bias is below n / 2^64)."""
    return (derive_seed(seed, "replay-" + purpose, layer, counter) * n) >> 64
