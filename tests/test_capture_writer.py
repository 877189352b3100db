"""The capture writer (runner/distill/capture_writer.py): captures reach the replay store in
submission order with the splits and bytes of sequential inserts, in-flight bytes stay under the
bound (the sampling waits, and the wait is counted), and errors on either side are raised, not
dropped. On a GPU: staged through pinned buffers, the stored bits are the device tensors' bits."""

from __future__ import annotations

import threading
import time

import pytest
from test_replay_helpers import make_capture, ram_tmpdir, remove, same_bits

from core.distill.ratio_limiter import RatioLimiterConfig
from core.distill.replay_policy import ReplayPolicyConfig
from runner.distill.capture_writer import CaptureWriter, StagingPool
from runner.replay import ReplayClient, ReplayConfig, ReplayStore

FREE = RatioLimiterConfig(samples_per_insert=1, error_buffer=10**9)  # inserts never wait


@pytest.fixture
def dirs(tmp_path):
    ram = ram_tmpdir("tsr-writer-test-")
    yield ram, tmp_path
    remove(ram)


def open_client(dirs, name: str) -> ReplayClient:
    ram, disk = dirs
    cfg = ReplayConfig(
        ram_dir=str(ram / name),
        disk_dir=str(disk / name),
        policy=ReplayPolicyConfig(limiter=FREE, ram_bytes=10**7, disk_bytes=10**7, validation_fraction=0.25),
    )
    return ReplayClient.local(ReplayStore(cfg, "node0"))


def layer_of(i: int) -> str:
    return f"single:{i % 3}"


@pytest.mark.cpu
def test_written_in_order_with_the_splits_and_bits_of_sequential_inserts(dirs):
    captures = [make_capture(i, layer_of(i), n=40) for i in range(12)]
    sequential = open_client(dirs, "seq")
    expected = [sequential.insert(c) for c in captures]
    threaded = open_client(dirs, "thr")
    with CaptureWriter(threaded.insert, None, limit_bytes=3 * captures[0].nbytes) as writer:
        for c in captures:
            writer.submit(c)
    got = writer.report.inserted
    assert [(layer, ins.order, ins.split) for layer, ins, _ in got] == [
        (c.meta.layer, e.order, e.split) for c, e in zip(captures, expected, strict=True)
    ]
    assert [nbytes for _, _, nbytes in got] == [c.nbytes for c in captures]
    assert {e.split for e in expected} == {"train", "val"}  # both splits are exercised
    for (_, ins, _), c in zip(got, captures, strict=True):
        ref = threaded._call("locate", ins.order)
        assert same_bits(threaded.read(ref).capture, c)


@pytest.mark.cpu
def test_the_sampling_waits_while_the_bound_is_full_and_the_wait_is_counted():
    captures = [make_capture(i, n=40) for i in range(3)]
    gate, written = threading.Event(), []

    def slow_insert(capture):
        gate.wait(10.0)
        written.append(capture.meta.step)

    writer = CaptureWriter(slow_insert, None, limit_bytes=2 * captures[0].nbytes)
    writer.submit(captures[0])
    writer.submit(captures[1])  # two in flight: the bound is full
    third = threading.Thread(target=writer.submit, args=(captures[2],))
    third.start()
    third.join(0.3)
    assert third.is_alive()  # waiting for room
    gate.set()
    third.join(10.0)
    report = writer.close()
    assert written == [0, 1, 2]
    assert report.stall_s >= 0.25


@pytest.mark.cpu
def test_a_failed_insert_is_raised_at_the_next_submit_and_at_close():
    captures = [make_capture(i, n=40) for i in range(4)]

    def insert(capture):
        if capture.meta.step == 1:
            raise OSError("disk full: /tmp/replay")
        return capture.meta.step

    writer = CaptureWriter(insert, None, limit_bytes=10**9)
    writer.submit(captures[0])
    writer.submit(captures[1])
    deadline = time.monotonic() + 10.0
    while writer._error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(RuntimeError, match="capture writer failed: disk full"):
        writer.submit(captures[2])
    with pytest.raises(RuntimeError, match="disk full"):
        writer.close()
    assert [inserted for _, inserted, _ in writer.report.inserted] == [0]  # nothing after the failure


@pytest.mark.cpu
def test_an_error_in_the_sampling_stops_the_writer_and_is_raised():
    captures = [make_capture(i, n=40) for i in range(2)]
    written = []
    writer = CaptureWriter(lambda c: written.append(c.meta.step), None, limit_bytes=10**9)
    with pytest.raises(ValueError, match="sampling failed"), writer:
        writer.submit(captures[0])
        raise ValueError("sampling failed")
    assert not writer._thread.is_alive()
    assert written in ([], [0])  # the write in progress may finish; nothing after the error starts


@pytest.mark.gpu
def test_device_captures_are_staged_through_pinned_buffers_bit_exactly():
    captures = [make_capture(i, n=64) for i in range(6)]
    kept = []
    pool = StagingPool(keep_bytes=10**9)
    with CaptureWriter(lambda c: kept.append(c.copy_to("cpu")), pool, limit_bytes=10**9) as writer:
        for c in captures:
            writer.submit(c.copy_to("cuda"))
    assert all(same_bits(a, b) for a, b in zip(kept, captures, strict=True))
    assert all(k.query_index.device.type == "cpu" for k in kept)
