"""One node's replay store: the policy's decisions carried out on the tier directories.

The store holds no tensors. Producers and consumers in other processes of the node read and write
the shard files themselves (`runner.replay.client`); the store hands out paths, keeps the small
index (order, layer, tier, size, checksum, step, sigma, ...) and decides admission, spills,
evictions and samples. It runs as a Ray actor (`runner.replay.actor`), one call at a time, so its
index needs no locks; it is also a plain object for in-process use.

Insert: `begin_insert(meta, nbytes)` makes room (spill/evict, each step within budget), reserves
`nbytes` in the RAM tier and returns a ticket with the path; the producer writes at most that many
bytes there and calls `commit_insert(order, crc32)` (or `abort_insert`). A ticket not committed
within PENDING_TTL_S (a producer that died) is aborted and its file deleted, so a lost producer
cannot hold budget forever.

Damage: consumers check a shard's size on every open and its CRC-32 on their first read of it; a
mismatch is reported with `report_damaged`, which re-checks the file here and, if it is bad, renames
it into the tier's quarantine folder and records it in `stats()`. The capture is never served
again; the rest keep serving. `load_state_dict` checks that every shard of the checkpoint exists
with its recorded size (the CRC is left to the first read, so a resume does not read every byte).

Checkpoint: `state_dict()` is the shard list with checksums and metadata, the policy's index, its
counters and its draw positions. `load_state_dict` adopts the listed files and deletes any other
shard file in the tier directories (e.g. captures inserted after the checkpoint was taken), so a
store resumed from a checkpoint whose files are intact gives the same sample sequence as one that
never stopped. Inserts in flight at checkpoint time are not part of it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from core.distill.capture import CaptureMeta
from core.distill.replay_policy import Blocked, ReplayPolicy, Split
from core.distill.tiers import TIERS, RoomAction, Tier
from runner.replay.config import ReplayConfig
from runner.replay.shards import check_shard
from runner.replay.tier_files import TierDirs

PENDING_TTL_S = 600.0


@dataclass(frozen=True)
class InsertTicket:
    """Write at most `nbytes` to `path` (a new file), then commit with the file's CRC-32."""

    order: int
    layer: str
    split: Split
    path: str
    nbytes: int


@dataclass(frozen=True)
class SampleRef:
    """Where a sampled capture is: a shard path and a row, with what is needed to check it."""

    order: int
    layer: str
    split: Split
    path: str
    row: int
    nbytes: int
    crc32: int
    times_sampled: int
    meta: CaptureMeta


@dataclass(frozen=True)
class ClearedLayer:
    """What `clear_layer` deleted: the layer's committed captures and their bytes."""

    layer: str
    captures: int
    nbytes: int


@dataclass(frozen=True)
class QuarantineRecord:
    order: int
    layer: str
    reason: str
    path: str


@dataclass(kw_only=True)
class StoreCounters:
    inserted: int = 0
    aborted: int = 0
    expired: int = 0
    spilled: int = 0
    spilled_bytes: int = 0
    evicted: int = 0
    evicted_bytes: int = 0
    discarded: int = 0
    cleared: int = 0
    cleared_bytes: int = 0
    sampled: int = 0
    validation_sampled: int = 0
    missing_on_load: int = 0
    orphans_removed: int = 0
    blocked: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ReplayStats:
    node_id: str
    policy: dict
    counters: StoreCounters
    quarantined: tuple[QuarantineRecord, ...]


@dataclass(frozen=True)
class _Shard:
    meta: CaptureMeta
    crc32: int


class ReplayStore:
    def __init__(self, cfg: ReplayConfig, node_id: str, state: dict | None = None) -> None:
        """A store over `cfg`'s tier directories for `node_id`: resumed from `state`, or empty (any
        shard files already there are deleted)."""
        self.cfg = cfg
        self.node_id = node_id
        self.policy = ReplayPolicy(cfg.policy)
        budgets = {t: cfg.policy.budget(t) for t in TIERS}
        self.dirs = TierDirs(cfg.tier_dirs(node_id), budgets)
        self._shards: dict[int, _Shard] = {}
        self._pending: dict[int, tuple[InsertTicket, CaptureMeta, float]] = {}
        self.counters = StoreCounters()
        self.quarantined: list[QuarantineRecord] = []
        self.load_state_dict(state or self._empty_state())

    def _empty_state(self) -> dict:
        return {"policy": ReplayPolicy(self.cfg.policy).state_dict(), "shards": [], "quarantined": []}

    # ---- insert -----------------------------------------------------------------------------
    def begin_insert(self, meta: CaptureMeta, nbytes: int) -> InsertTicket | Blocked:
        self._expire_stale()
        verdict = self.policy.check_insert(meta.layer, nbytes)
        if isinstance(verdict, Blocked):
            return self._blocked("insert", verdict)
        while (action := self.policy.next_room_action(nbytes)) is not None:
            self._carry_out(action)
            self.policy.apply(action)
        first = self.policy.insert_tier()
        self.dirs.check_filesystem(first, nbytes, used=self.policy.used(first))
        r = self.policy.reserve(meta.layer, nbytes)
        ticket = InsertTicket(r.order, r.layer, r.split, str(self.dirs.path(r.tier, r.order)), nbytes)
        self._pending[r.order] = (ticket, meta, time.monotonic())
        return ticket

    def commit_insert(self, order: int, crc32: int) -> None:
        ticket, meta, _ = self._take_pending(order)
        path = Path(ticket.path)
        size = path.stat().st_size if path.exists() else -1
        if size != ticket.nbytes:
            path.unlink(missing_ok=True)
            self.policy.abort(order)
            self.counters.aborted += 1
            raise ValueError(f"capture {order}: {path} has {size} bytes, the ticket reserved {ticket.nbytes}")
        self.policy.commit(order)
        self._shards[order] = _Shard(meta, crc32)
        self.counters.inserted += 1

    def abort_insert(self, order: int) -> None:
        ticket, _, _ = self._take_pending(order)
        Path(ticket.path).unlink(missing_ok=True)
        self.policy.abort(order)
        self.counters.aborted += 1

    def _take_pending(self, order: int) -> tuple[InsertTicket, CaptureMeta, float]:
        if order not in self._pending:
            raise KeyError(
                f"capture {order} has no insert in flight (expired after {PENDING_TTL_S:g} s, or done)"
            )
        return self._pending.pop(order)

    def _expire_stale(self) -> None:
        now = time.monotonic()
        for order, (ticket, _, started) in list(self._pending.items()):
            if now - started > PENDING_TTL_S:
                del self._pending[order]
                Path(ticket.path).unlink(missing_ok=True)
                self.policy.abort(order)
                self.counters.expired += 1

    def _carry_out(self, action: RoomAction) -> None:
        if action.kind == "spill":
            self.dirs.spill(action.order, disk_used=self.policy.used("disk"))
            self.counters.spilled += 1
            self.counters.spilled_bytes += action.nbytes
        elif action.kind == "evict":
            self.dirs.delete(action.tier, action.order)
            del self._shards[action.order]
            self.counters.evicted += 1
            self.counters.evicted_bytes += action.nbytes
        else:
            self.dirs.delete(action.tier, action.order, quarantined=True)
            self._shards.pop(action.order, None)
            self.counters.discarded += 1

    # ---- sample -----------------------------------------------------------------------------
    def sample(self, layer: str, n: int = 1) -> list[SampleRef] | Blocked:
        """n distinct training captures of `layer` (uniform, seeded), or why not now."""
        got = self.policy.sample(layer, n)
        if isinstance(got, Blocked):
            return self._blocked("sample", got)
        self.counters.sampled += n
        return [self._ref(o) for o in got]

    def sample_validation(self, layer: str, n: int) -> list[SampleRef]:
        """Up to n distinct held-out captures of `layer` (never used for training)."""
        got = self.policy.sample_validation(layer, n)
        self.counters.validation_sampled += len(got)
        return [self._ref(o) for o in got]

    def locate(self, order: int) -> SampleRef | None:
        """Where capture `order` is now (it may have spilled since it was sampled), or None if gone."""
        e = self.policy.entries.get(order)
        return self._ref(order) if e is not None and e.state == "ready" else None

    def _ref(self, order: int) -> SampleRef:
        e = self.policy.entries[order]
        shard = self._shards[order]
        path = str(self.dirs.path(e.tier, order))
        return SampleRef(order, e.layer, e.split, path, 0, e.nbytes, shard.crc32, e.times_sampled, shard.meta)

    def _blocked(self, call: str, b: Blocked) -> Blocked:
        key = f"{call}:{b.reason}"
        self.counters.blocked[key] = self.counters.blocked.get(key, 0) + 1
        return b

    def clear_layer(self, layer: str) -> ClearedLayer:
        """Delete every committed capture of `layer` (its training and held-out ones) and their files:
        what an OOM ladder's rung asks for that layer. Other layers are untouched."""
        gone = self.policy.clear_layer(layer)
        for e in gone:
            self.dirs.delete(e.tier, e.order)
            del self._shards[e.order]
        nbytes = sum(e.nbytes for e in gone)
        self.counters.cleared += len(gone)
        self.counters.cleared_bytes += nbytes
        return ClearedLayer(layer, len(gone), nbytes)

    # ---- damage -----------------------------------------------------------------------------
    def report_damaged(self, order: int, reason: str) -> bool:
        """A consumer found capture `order` damaged. Re-checked here; quarantined if bad. Returns
        whether it is (now) out of service."""
        e = self.policy.entries.get(order)
        if e is None or e.state != "ready":
            return True  # already gone or quarantined
        path = self.dirs.path(e.tier, order)
        if not path.exists():
            return self.locate(order) is None
        found = check_shard(path, e.nbytes, self._shards[order].crc32)
        if found is None:
            return False
        self._quarantine(order, f"{found} (reported: {reason})")
        return True

    def _quarantine(self, order: int, reason: str) -> None:
        e = self.policy.entries[order]
        aside = self.dirs.quarantine(e.tier, order)
        self.policy.quarantine(order)
        self.quarantined.append(QuarantineRecord(order, e.layer, reason, str(aside)))

    # ---- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "policy": self.policy.state_dict(),
            "shards": [
                {"order": o, "crc32": s.crc32, "meta": asdict(s.meta)} for o, s in self._shards.items()
            ],
            "quarantined": [asdict(q) for q in self.quarantined],
        }

    def load_state_dict(self, state: dict) -> None:
        """Adopt the checkpoint's shards (each must exist with its size), delete every other shard
        file of the tiers, and check that the filesystems can hold the budgets."""
        for ticket, _, _ in self._pending.values():
            Path(ticket.path).unlink(missing_ok=True)
        self._pending = {}
        self.policy.load_state_dict(state["policy"])
        self._shards = {s["order"]: _Shard(CaptureMeta(**s["meta"]), s["crc32"]) for s in state["shards"]}
        self.quarantined = [QuarantineRecord(**q) for q in state["quarantined"]]
        for e in list(self.policy.entries.values()):
            path = self.dirs.path(e.tier, e.order, quarantined=e.state == "quarantined")
            size = path.stat().st_size if path.exists() else None
            if size is None:
                self.policy.forget(e.order)
                self._shards.pop(e.order, None)
                self.counters.missing_on_load += 1
            elif e.state == "ready" and size != e.nbytes:
                self._quarantine(e.order, f"truncated: {size} bytes, expected {e.nbytes}")
        keep = {
            self.dirs.path(e.tier, e.order, quarantined=e.state == "quarantined")
            for e in self.policy.entries.values()
        }
        self.counters.orphans_removed += len(self.dirs.sweep(keep))
        for tier in self.dirs.dirs:
            used = self.policy.used(tier)
            self.dirs.check_filesystem(tier, self.cfg.policy.budget(tier) - used, used=used)

    # ---- inspection -------------------------------------------------------------------------
    def stats(self) -> ReplayStats:
        return ReplayStats(self.node_id, self.policy.summary(), self.counters, tuple(self.quarantined))

    def audit(self) -> dict[Tier, tuple[int, int, int]]:
        """(bytes of the tier's files as the filesystem reports them, bytes the index accounts for,
        budget) per tier that is on. The first equals the second when no write is in flight."""
        measured = self.dirs.measured_bytes()
        return {t: (measured[t], self.policy.used(t), self.cfg.policy.budget(t)) for t in self.dirs.dirs}

    def config(self) -> ReplayConfig:
        return self.cfg

    def close(self, *, delete_files: bool = False) -> None:
        """Release the tier directories (and delete every shard file in them if asked)."""
        if delete_files:
            self.dirs.sweep(set())
        self.dirs.close()
