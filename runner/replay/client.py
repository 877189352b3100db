"""The producer's and the consumer's side of a replay store, in their own processes on its node.

Tensors never pass through the store or the Ray object store: `insert` writes the shard file itself
into the path the store hands out, and `sample` maps the files the store names. Only tickets and
references (a few hundred bytes) cross the actor boundary.

Reads are zero-copy: a `SampledCapture`'s tensors are views of a read-only memory map. Copy them
before writing (`capture.copy_to(device)`), and drop the views when done: the map (and, for an
evicted shard, its pages) lives as long as they do.

Races with the store: a shard sampled here may be spilled (moved to disk) or evicted before it is
opened. Opening the old path then fails, the client asks the store where the capture is now
(`locate`), and if it is gone, samples again. Once a shard is mapped, spills and evictions cannot
disturb it (an unlinked file stays readable while mapped). Each shard's size is checked on every
open and its CRC-32 on this process's first read of it; a damaged one is reported (the store
quarantines it) and replaced by another sample.

Mappings are kept between samples (up to `map_cache_bytes`, least recently used first out): setting
up a fresh map of a large shard costs about as much as copying it again (the page tables are
rebuilt), so a shard sampled again is read at memory-copy speed. A kept map whose file the store has
since spilled or evicted (its link count is 0) is dropped at the next sample call, so the pages of deleted
shards that this process keeps alive are bounded by `map_cache_bytes` plus the views it holds.

Waiting: the store never blocks (one call at a time would stall every other caller); `try_insert`
and `try_sample` return `Blocked` with a reason, and `insert` / `sample` poll with a short backoff
until the store admits them or `timeout_s` passes (ReplayTimeout).
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from core.distill.capture import Capture
from core.distill.replay_policy import Blocked, Split
from runner.replay.shards import (
    ShardError,
    capture_batch,
    check_mapped,
    host_capture,
    read_capture,
    shard_size,
    with_order,
    write_shard,
)
from runner.replay.store import ClearedLayer, InsertTicket, ReplayStore, SampleRef

VERIFIED_CACHE = 65536  # shards whose CRC this process has checked (keys only, a few MB at most)
MAP_CACHE_BYTES = 1 << 30  # shards kept mapped between samples (re-mapping costs more than the copy)
MAP_CACHE_FILES = 256


class ReplayTimeout(TimeoutError):
    """The store did not admit an insert or a sample within the caller's timeout."""


@dataclass(frozen=True)
class Inserted:
    order: int
    split: Split


@dataclass(frozen=True, eq=False)
class SampledCapture:
    """A sampled capture: read-only views of its shard (`capture`) and the store's reference."""

    ref: SampleRef
    capture: Capture


class ReplayClient:
    """Talks to one store: in-process (`local`) or the node's actor (`actor.client_for_node`)."""

    def __init__(self, call: Callable[..., Any], *, map_cache_bytes: int = MAP_CACHE_BYTES) -> None:
        self._call = call  # call(method_name, *args) -> the store method's result
        self.map_cache_bytes = map_cache_bytes
        self._verified: OrderedDict[tuple, None] = OrderedDict()
        self._maps: OrderedDict[tuple[int, str], pa.MemoryMappedFile] = OrderedDict()
        self._parsed: dict[tuple[int, str], tuple[Capture, int]] = {}  # views of kept maps, parsed once
        self._mapped_bytes = 0

    @classmethod
    def local(cls, store: ReplayStore, *, map_cache_bytes: int = MAP_CACHE_BYTES) -> ReplayClient:
        return cls(lambda name, *args: getattr(store, name)(*args), map_cache_bytes=map_cache_bytes)

    # ---- insert -----------------------------------------------------------------------------
    def try_insert(self, capture: Capture) -> Inserted | Blocked:
        """Write `capture` into the store now, or return why it must wait."""
        capture = host_capture(capture)
        batch = capture_batch(capture, order=0)
        nbytes = shard_size(batch)  # the order's value does not change the size
        ticket: InsertTicket | Blocked = self._call("begin_insert", capture.meta, nbytes)
        if isinstance(ticket, Blocked):
            return ticket
        try:
            written = write_shard(ticket.path, with_order(batch, ticket.order), limit=ticket.nbytes)
        except BaseException:
            self._call("abort_insert", ticket.order)
            raise
        self._call("commit_insert", ticket.order, written.crc32)
        return Inserted(ticket.order, ticket.split)

    def insert(self, capture: Capture, *, timeout_s: float | None = None) -> Inserted:
        return _wait(lambda: self.try_insert(capture), timeout_s, f"insert into layer {capture.meta.layer!r}")

    # ---- sample -----------------------------------------------------------------------------
    def try_sample(self, layer: str, n: int = 1) -> list[SampledCapture] | Blocked:
        """Up to n training captures of `layer` (see `ReplayStore.sample`), mapped, or why not now.
        Fewer than n only if some were evicted or found damaged between the store's choice and here
        (those samples still count toward the limiter and the reuse cap)."""
        refs = self._call("sample", layer, n)
        if isinstance(refs, Blocked):
            return refs
        self._forget_deleted_maps()
        return [s for s in map(self.read, refs) if s is not None]

    def sample(self, layer: str, n: int = 1, *, timeout_s: float | None = None) -> list[SampledCapture]:
        """n training captures of `layer`, waiting while the store says so (at most timeout_s)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        out: list[SampledCapture] = []
        while len(out) < n:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            out.extend(
                _wait(lambda: self.try_sample(layer, n - len(out)), left, f"sample from layer {layer!r}")
            )
        return out

    def sample_validation(self, layer: str, n: int) -> list[SampledCapture]:
        """Up to n held-out captures of `layer` (fewer if the layer has fewer, or some were damaged)."""
        refs = self._call("sample_validation", layer, n)
        self._forget_deleted_maps()
        return [s for s in map(self.read, refs) if s is not None]

    def read(self, ref: SampleRef) -> SampledCapture | None:
        """Map and check the shard of `ref`; None if the capture is gone or damaged (then reported)."""
        for _ in range(3):  # a shard can spill between `sample` and here; follow it
            try:
                mapped = self._map(ref)
            except FileNotFoundError:
                ref = self._call("locate", ref.order)
                if ref is None:
                    return None
                continue
            problem = self._check(mapped, ref)
            if problem is None:
                try:
                    capture, order = self._parse(mapped, ref)
                except ShardError as err:
                    problem = str(err)
                else:
                    if order == ref.order:
                        return SampledCapture(ref, capture)
                    problem = f"shard holds capture {order}, expected {ref.order}"
            self._unmap((ref.order, ref.path))
            if not self._call("report_damaged", ref.order, problem):
                raise RuntimeError(
                    f"capture {ref.order} at {ref.path} looked damaged here ({problem}) but not to the store"
                )
            return None
        return None

    def _forget_deleted_maps(self) -> None:
        """Drop kept maps whose files were spilled or evicted since (link count 0): let their pages go."""
        for key, kept in list(self._maps.items()):
            if os.fstat(kept.fileno()).st_nlink == 0:
                self._unmap(key)

    def _map(self, ref: SampleRef) -> pa.MemoryMappedFile:
        key = (ref.order, ref.path)
        if key in self._maps and os.fstat(self._maps[key].fileno()).st_nlink == 0:
            self._unmap(key)  # the file moved or went since it was mapped: look again
        if key in self._maps:
            self._maps.move_to_end(key)
            return self._maps[key]
        mapped = pa.memory_map(ref.path)
        if mapped.size() <= self.map_cache_bytes:
            self._maps[key] = mapped
            self._mapped_bytes += mapped.size()
            while self._mapped_bytes > self.map_cache_bytes or len(self._maps) > MAP_CACHE_FILES:
                self._unmap(next(iter(self._maps)))
        return mapped

    def _parse(self, mapped: pa.MemoryMappedFile, ref: SampleRef) -> tuple[Capture, int]:
        key = (ref.order, ref.path)
        if ref.row == 0 and key in self._parsed:
            return self._parsed[key]
        parsed = read_capture(mapped, ref.row)
        if ref.row == 0 and key in self._maps:
            self._parsed[key] = parsed
        return parsed

    def _unmap(self, key: tuple[int, str]) -> None:
        """Forget a kept map (views of it stay valid: the mapping ends with the last of them)."""
        kept = self._maps.pop(key, None)
        self._parsed.pop(key, None)
        if kept is not None:
            self._mapped_bytes -= kept.size()

    def _check(self, mapped: pa.MemoryMappedFile, ref: SampleRef) -> str | None:
        st = os.fstat(mapped.fileno())
        key = (ref.order, ref.path, st.st_ino, st.st_size, st.st_mtime_ns)
        if st.st_size != ref.nbytes:
            kind = "truncated" if st.st_size < ref.nbytes else "oversized"
            return f"{kind}: {st.st_size} bytes, expected {ref.nbytes}"
        if key in self._verified:
            return None
        problem = check_mapped(mapped, ref.nbytes, ref.crc32)
        if problem is None:
            self._verified[key] = None
            if len(self._verified) > VERIFIED_CACHE:
                self._verified.popitem(last=False)
        return problem

    def clear_layer(self, layer: str) -> ClearedLayer:
        """Delete every committed capture of `layer` from the store (ReplayStore.clear_layer), and let
        go of this process's kept maps of their files, so their pages are freed here too."""
        cleared = self._call("clear_layer", layer)
        self._forget_deleted_maps()
        return cleared

    # ---- the rest of the store's surface ----------------------------------------------------
    def stats(self):
        return self._call("stats")

    def state_dict(self) -> dict:
        return self._call("state_dict")

    def load_state_dict(self, state: dict) -> None:
        self._call("load_state_dict", state)


def _wait(attempt: Callable[[], Any], timeout_s: float | None, what: str) -> Any:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    delay = 0.001
    while True:
        result = attempt()
        if not isinstance(result, Blocked):
            return result
        if deadline is not None and time.monotonic() + delay > deadline:
            raise ReplayTimeout(f"{what}: still blocked ({result.reason}) after {timeout_s:g} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
