"""Captures into the replay store off the sampling thread: pinned staging and one writer thread.

A capture keeps one layer's full K and V: 60 MB for Flux at 1024², 200 MB at 2048², 810 MB at
4096². Written on the sampling thread, each one cost a copy to pageable host memory (1.6 GB/s on an
H200 host) and a shard write with its checksum (runner/replay/shards.py), and the teacher's step
took twice as long as a generation's. Here the sampling thread only queues a copy from the device
into a pinned host buffer (55 GB/s, asynchronous on the compute stream, ordered after the kernels
that produced the tensors) and hands the capture to a writer thread. The writer waits for that
copy's event, writes the shard (`ReplayClient.insert`) and returns the buffer to the pool.

One writer thread keeps the store's insertion order equal to the capture order, so the store's
train/validation split and its evictions are those of inserting one capture after another, and a
run's captures do not depend on how fast the writer is. Host memory is bounded: at most
`limit_bytes` of captures are in flight (queued or being written); past that, the sampling thread
waits for the writer, and the wait is recorded (`WriterReport.stall_s`). On a CPU the captures are
already fresh host copies: they skip the staging and go to the same queue under the same bound.

A failed insert is not dropped: the writer stops taking work, and the error is raised on the
sampling thread at its next `submit` or at `close`.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from core.distill.capture import TENSOR_FIELDS, Capture

ALIGN = 64  # bytes: each tensor's offset in a staging buffer


@dataclass
class WriterReport:
    """What one writer did: the store's answers in capture order, and where its time went."""

    inserted: list[tuple[str, Any, int]] = field(default_factory=list)  # (layer, Inserted, bytes)
    stall_s: float = 0.0  # the sampling thread waiting for room (the writer slower than the captures)
    close_s: float = 0.0  # the sampling thread waiting at the end for the last writes
    write_s: float = 0.0  # the writer thread busy (copy wait, shard write, store calls)


class StagingPool:
    """Pinned host buffers for captures, reused across captures and runs (pinning is slow: one
    cudaHostAlloc per buffer). Buffers are kept by size (a run's captures have a few sizes), at most
    `keep_bytes` of them while unused; the writer's bound limits those in use."""

    def __init__(self, keep_bytes: int) -> None:
        self.keep_bytes = keep_bytes
        self._free: dict[int, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            free = self._free.get(nbytes)
            if free:
                return free.pop()
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def give(self, buffer: torch.Tensor) -> None:
        with self._lock:
            if self._held() + buffer.numel() <= self.keep_bytes:
                self._free.setdefault(buffer.numel(), []).append(buffer)

    def _held(self) -> int:
        return sum(n * len(b) for n, b in self._free.items())


def _layout(capture: Capture) -> tuple[list[tuple[str, int]], int]:
    """Each tensor field's byte offset in one staging buffer, and the buffer's size."""
    offsets, end = [], 0
    for name in TENSOR_FIELDS:
        offsets.append((name, end))
        end += -(-getattr(capture, name).nbytes // ALIGN) * ALIGN
    return offsets, end


def stage(capture: Capture, buffer: torch.Tensor) -> Capture:
    """The capture's tensors copied into views of the pinned `buffer`, queued on the current stream
    (read them only after an event recorded after this call has completed)."""
    fields = {}
    for name, offset in _layout(capture)[0]:
        src = getattr(capture, name)
        view = buffer[offset : offset + src.nbytes].view(src.dtype).view(src.shape)
        fields[name] = view.copy_(src, non_blocking=True)
    return Capture(meta=capture.meta, query_index=capture.query_index.cpu(), **fields)


class CaptureWriter:
    """A FIFO of captures into `insert` (ReplayClient.insert), written by one thread.

    Use as a context manager: leaving it normally waits for every write (`close`); leaving on an
    error stops the writer after the write in progress and raises the sampling error."""

    def __init__(
        self, insert: Callable[[Capture], Any], staging: StagingPool | None, *, limit_bytes: int
    ) -> None:
        self._insert, self._staging, self.limit_bytes = insert, staging, limit_bytes
        self._queue: queue.Queue = queue.Queue()
        self._room = threading.Condition()
        self._in_flight = 0
        self._error: BaseException | None = None
        self._stop = False
        self.report = WriterReport()
        self._thread = threading.Thread(target=self._run, name="capture-writer", daemon=True)
        self._thread.start()

    def submit(self, capture: Capture) -> None:
        """Queue `capture` (device tensors are staged to pinned memory first); waits while the
        captures in flight would exceed the bound (at least one is always admitted)."""
        self._raise_failed()
        nbytes = capture.nbytes
        start = time.perf_counter()
        with self._room:
            while self._in_flight and self._in_flight + nbytes > self.limit_bytes and not self._failed():
                self._room.wait(timeout=1.0)
            self._in_flight += nbytes
        self.report.stall_s += time.perf_counter() - start
        self._raise_failed()
        buffer = event = None
        if capture.k.device.type == "cuda":
            if self._staging is None:
                raise ValueError("a capture on a CUDA device needs the writer's staging pool")
            buffer = self._staging.take(_layout(capture)[1])
            capture = stage(capture, buffer)
            event = torch.cuda.Event()
            event.record()
        self._queue.put((capture, event, buffer, nbytes))

    def close(self) -> WriterReport:
        """Wait for every queued write; raise the writer's error, if any."""
        start = time.perf_counter()
        self._queue.put(None)
        self._thread.join()
        self.report.close_s += time.perf_counter() - start
        self._raise_failed()
        return self.report

    def __enter__(self) -> CaptureWriter:
        return self

    def __exit__(self, kind, error, tb) -> None:
        if kind is None:
            self.close()
            return
        self._stop = True  # the sampling failed: finish the write in progress, skip the rest
        self._queue.put(None)
        self._thread.join()

    def _failed(self) -> bool:
        return self._error is not None

    def _raise_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the capture writer failed: {self._error}") from self._error

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            capture, event, buffer, nbytes = job
            start = time.perf_counter()
            try:
                if event is not None:
                    event.synchronize()  # the staging copy has landed (and the pinned buffer is ours)
                if self._error is None and not self._stop:
                    inserted = self._insert(capture)
                    self.report.inserted.append((capture.meta.layer, inserted, nbytes))
            except BaseException as err:  # raised on the sampling thread by submit / close
                self._error = err
            finally:
                if buffer is not None:
                    del capture
                    self._staging.give(buffer)  # type: ignore[union-attr]
                self.report.write_s += time.perf_counter() - start
                with self._room:
                    self._in_flight -= nbytes
                    self._room.notify_all()
