"""The replay store on real files, in-process: shard round trips, budgets on disk, eviction, damage,
checkpoint and resume. (The actor and several nodes: test_replay_actor.py, test_replay_multinode.py.)"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from test_replay_helpers import make_capture, ram_tmpdir, remove, same_bits

from core.distill.capture import Capture
from core.distill.ratio_limiter import RatioLimiterConfig
from core.distill.replay_policy import Blocked, ReplayPolicyConfig
from core.distill.tiers import CaptureTooLarge
from core.state import Stateful
from runner.replay import ReplayClient, ReplayConfig, ReplayStore, TierFull
from runner.replay.shards import capture_batch, shard_size

pytestmark = pytest.mark.cpu
FREE = RatioLimiterConfig(samples_per_insert=1, error_buffer=10**9)


def size_of(capture) -> int:
    return shard_size(capture_batch(capture, 0))


@pytest.fixture
def dirs(tmp_path):
    ram = ram_tmpdir("tsr-replay-test-")
    yield ram, tmp_path / "disk"
    remove(ram)


def open_store(dirs, **policy) -> tuple[ReplayStore, ReplayClient]:
    ram, disk = dirs
    cfg = ReplayConfig(
        ram_dir=str(ram), disk_dir=str(disk), policy=ReplayPolicyConfig(**{"limiter": FREE, **policy})
    )
    store = ReplayStore(cfg, "node0")
    return store, ReplayClient.local(store)


def files(d: Path) -> list[int]:
    return sorted(int(p.name[:12]) for p in d.glob("*.arrow"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_round_trip_is_bit_exact_and_reads_allocate_no_arrow_heap(dirs, dtype):
    store, client = open_store(dirs, ram_bytes=10**6, disk_bytes=10**6)
    cap = make_capture(0, dtype=dtype)
    specials = torch.tensor([float("nan"), -0.0, float("inf"), -float("inf"), 1e-40, 65504.0]).to(dtype)
    cap.k.view(-1)[: specials.numel()] = specials  # NaN, -0, +-inf, a subnormal (fp32), fp16's max
    client.insert(cap)
    before = pa.total_allocated_bytes()
    (got,) = client.sample("single:0", 1)
    assert pa.total_allocated_bytes() == before  # the read is a memory map: no Arrow heap
    assert same_bits(got.capture, cap) and got.capture.k.dtype == dtype
    assert got.ref.path.startswith(str(dirs[0])) and got.ref.meta == cap.meta
    copy = got.capture.copy_to("cpu")
    copy.k.add_(1)  # a copy is writable and independent of the map
    assert same_bits(client.sample("single:0", 1)[0].capture, cap)
    store.close(delete_files=True)


def test_sustained_insert_of_ten_times_the_budget_never_exceeds_either_tier(dirs):
    sizes = {layer: size_of(make_capture(0, layer, n=n)) for layer, n in (("a", 24), ("b", 68), ("c", 148))}
    ram_budget, disk_budget = 3 * sizes["b"], 5 * sizes["b"]
    store, client = open_store(dirs, ram_bytes=ram_budget, disk_bytes=disk_budget)
    peak = {"ram": 0, "disk": 0}
    stop = threading.Event()

    def watch():  # the tiers' bytes as the filesystem reports them, polled while inserts run
        while not stop.is_set():
            for tier, measured in store.dirs.measured_bytes().items():
                peak[tier] = max(peak[tier], measured)

    watcher = threading.Thread(target=watch)
    watcher.start()
    inserted, i = 0, 0
    try:
        while inserted < 10 * (ram_budget + disk_budget):
            layer = "abc"[i % 3 if i % 4 else 1]
            client.insert(make_capture(i, layer, n={"a": 24, "b": 68, "c": 148}[layer]))
            inserted += sizes[layer]
            i += 1
            audit = store.audit()
            for tier, (measured, accounted, budget) in audit.items():
                assert measured == accounted <= budget, (i, tier, audit)  # checked after every write
            alive = sorted(store.policy.entries)
            assert alive == list(range(alive[0], i))  # oldest-first across layers: the newest survive
            assert max(files(dirs[1]), default=-1) < min(files(dirs[0]))  # disk holds the older ones
    finally:
        stop.set()
        watcher.join()
    assert peak["ram"] <= ram_budget and peak["disk"] <= disk_budget
    c = store.stats().counters
    assert c.inserted == i and c.spilled > 0 and c.evicted > 0
    assert c.evicted + len(store.policy.entries) == i
    store.close(delete_files=True)


def test_errors_for_a_capture_larger_than_a_tier_and_for_a_filesystem_short_of_the_budget(dirs):
    store, client = open_store(dirs, ram_bytes=5000, disk_bytes=10**6)
    with pytest.raises(CaptureTooLarge, match="exceeds the ram tier's whole budget of 5000 bytes"):
        client.insert(make_capture(0, n=300))
    store.close()
    huge = 1 << 62
    with pytest.raises(
        TierFull, match=rf"disk tier {dirs[1]}: the filesystem has \d+ bytes free.*budget {huge}"
    ):
        open_store(dirs, ram_bytes=5000, disk_bytes=huge)


def test_a_second_store_on_the_same_directories_is_refused(dirs):
    store, _ = open_store(dirs, ram_bytes=10**5, disk_bytes=10**5)
    with pytest.raises(RuntimeError, match="another replay store uses the ram tier directory"):
        open_store(dirs, ram_bytes=10**5, disk_bytes=10**5)
    store.close()


def test_corrupted_and_truncated_shards_are_quarantined_while_the_rest_keep_serving(dirs):
    store, client = open_store(dirs, ram_bytes=10**6, disk_bytes=10**6)
    caps = [make_capture(i) for i in range(5)]
    for c in caps:
        client.insert(c)
    ram = dirs[0]
    bad_crc, truncated = ram / "000000000001.arrow", ram / "000000000003.arrow"
    with open(bad_crc, "r+b") as f:  # flip one byte in the middle (inside the k payload)
        f.seek(os.path.getsize(bad_crc) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))
    os.truncate(truncated, os.path.getsize(truncated) - 100)
    served = set()
    for _ in range(40):
        for s in client.sample("single:0", 1):
            assert same_bits(s.capture, caps[s.ref.order])  # never bad data
            served.add(s.ref.order)
    assert served == {0, 2, 4}
    q = {r.order: r for r in store.stats().quarantined}
    assert sorted(q) == [1, 3]
    assert q[1].reason.startswith("checksum") and q[3].reason.startswith("truncated")
    assert all(Path(r.path).parent.name == "quarantine" and Path(r.path).exists() for r in q.values())
    assert not bad_crc.exists() and not truncated.exists()
    measured, accounted, _ = store.audit()["ram"]
    # Quarantined files still count against the budget until discarded, at their recorded size (the
    # truncated one is 100 bytes short on disk: the count is an upper bound).
    assert measured == accounted - 100
    store.close(delete_files=True)


def test_a_mapped_capture_survives_its_spill_and_eviction(dirs):
    size = size_of(make_capture(0))
    store, client = open_store(dirs, ram_bytes=2 * size, disk_bytes=2 * size)
    client.insert(make_capture(0))
    (held,) = client.sample("single:0", 1)  # views of the RAM shard
    ref = store.sample("single:0", 1)[0]  # a reference not yet opened
    for i in range(1, 3):
        client.insert(make_capture(i))  # capture 0 spills to disk
    moved = client.read(ref)  # the old RAM path is gone: the client follows the capture to disk
    assert moved is not None and moved.ref.path.startswith(str(dirs[1]))
    for i in range(3, 6):
        client.insert(make_capture(i))  # capture 0 is evicted
    assert client.read(ref) is None and 0 not in store.policy.entries
    assert same_bits(held.capture, make_capture(0)) and same_bits(moved.capture, make_capture(0))
    store.close(delete_files=True)


def drive(client: ReplayClient, plan: list[tuple[str, int]], made: dict[int, int]) -> list:
    """Insert capture k ("i", k) or sample a layer ("s", 0 or 1); returns what each sample gave.
    made: order -> k of the captures inserted so far (to check the bits of what is served)."""
    out = []
    for op, k in plan:
        if op == "i":
            done = client.try_insert(make_capture(k, f"single:{k % 2}"))
            if not isinstance(done, Blocked):
                made[done.order] = k
        else:
            got = client.try_sample(f"single:{k}", 1)
            out.append(got if isinstance(got, Blocked) else [(s.ref.order, s.ref.times_sampled) for s in got])
            if not isinstance(got, Blocked):
                assert all(same_bits(s.capture, make_capture(made[s.ref.order], s.ref.layer)) for s in got)
    return out


def test_checkpoint_and_resume_give_the_identical_sample_sequence(tmp_path):
    policy = dict(
        ram_bytes=4 * size_of(make_capture(0)),
        disk_bytes=6 * size_of(make_capture(0)),
        reuse_cap=3,
        limiter=RatioLimiterConfig(samples_per_insert=2, min_size=2, error_buffer=3),
        validation_fraction=0.25,
        seed=5,
    )
    rng = __import__("random").Random(0)
    plan = [("i", j) if rng.random() < 0.45 else ("s", rng.randrange(2)) for j in range(160)]
    first, rest = plan[:80], plan[80:]
    runs = {}
    for name in ("whole", "resumed"):
        ram, disk = ram_tmpdir(f"tsr-replay-{name}-"), tmp_path / name
        try:
            store, client = open_store((ram, disk), **policy)
            made: dict[int, int] = {}
            runs[name, "first"] = drive(client, first, made)
            if name == "resumed":
                assert isinstance(store, Stateful)
                saved = io.BytesIO()
                torch.save(store.state_dict(), saved)  # as the runner checkpoints it
                store.close()  # the process ends; its files stay
                state = torch.load(io.BytesIO(saved.getvalue()), weights_only=True)
                store = ReplayStore(store.cfg, "node0", state)
                client = ReplayClient.local(store)
            runs[name, "rest"] = drive(client, rest, made)
            runs[name, "state"] = store.state_dict()
            store.close(delete_files=True)
        finally:
            remove(ram)
    assert runs["whole", "first"] == runs["resumed", "first"]
    assert runs["whole", "rest"] == runs["resumed", "rest"]
    assert runs["whole", "state"] == runs["resumed", "state"]
    samples = [x for x in runs["whole", "rest"] if not isinstance(x, Blocked)]
    assert len(samples) > 10 and any(isinstance(x, Blocked) for x in runs["whole", "rest"])


def test_resume_drops_missing_shards_and_deletes_files_the_checkpoint_does_not_know(dirs):
    store, client = open_store(dirs, ram_bytes=10**6, disk_bytes=10**6)
    for i in range(3):
        client.insert(make_capture(i))
    state = store.state_dict()
    client.insert(make_capture(3))  # after the checkpoint: an orphan for the resumed store
    store.close()
    os.unlink(dirs[0] / "000000000001.arrow")
    resumed = ReplayStore(store.cfg, "node0", state)
    assert sorted(resumed.policy.entries) == [0, 2] and files(dirs[0]) == [0, 2]
    c = resumed.stats().counters
    assert (c.missing_on_load, c.orphans_removed) == (1, 1)
    resumed.close(delete_files=True)


def test_bad_configs_and_captures_are_errors_naming_the_field():
    policy = ReplayPolicyConfig(ram_bytes=1, disk_bytes=1)
    with pytest.raises(ValueError, match="replay disk_dir must be an absolute path, got 'rel/dir'"):
        ReplayConfig(ram_dir="/dev/shm/x", disk_dir="rel/dir", policy=policy)
    with pytest.raises(ValueError, match="ram_dir and disk_dir must differ"):
        ReplayConfig(ram_dir="/tmp/same", disk_dir="/tmp/same", policy=policy)
    with pytest.raises(ValueError, match="ram_bytes=-1"):
        ReplayPolicyConfig(ram_bytes=-1, disk_bytes=1)
    with pytest.raises(ValueError, match="reuse_cap 2 is below limiter.samples_per_insert 4"):
        ReplayPolicyConfig(ram_bytes=1, disk_bytes=1, reuse_cap=2)
    with pytest.raises(ValueError, match=r"validation_fraction must be in \[0, 1\), got 1.0"):
        ReplayPolicyConfig(ram_bytes=1, disk_bytes=1, validation_fraction=1.0)
    good = make_capture(0)
    parts = {f: getattr(good, f) for f in ("q_sub", "k", "v", "teacher_sub", "query_index")}
    with pytest.raises(ValueError, match=r"teacher_sub \(1, 2, 3, 8\) must match q_sub \(1, 2, 4, 8\)"):
        Capture(meta=good.meta, **{**parts, "teacher_sub": good.teacher_sub[:, :, :3]})
    with pytest.raises(ValueError, match="share one dtype"):
        Capture(meta=good.meta, **{**parts, "k": good.k.float()})
    with pytest.raises(ValueError, match=r"query_index must lie in \[0, 24\)"):
        Capture(meta=good.meta, **{**parts, "query_index": good.query_index + 1})
