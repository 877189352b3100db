"""Replay store throughput against the Ray object store, same captures, same machine, same run.

For each capture size (Flux.1 at 1024^2 and 2048^2: 24 heads x 128, N = 4608 / 16896 tokens, 128 kept
queries, bf16; the reference model at 256 and 512 px: 6 heads x 64, N = 260 / 1028), it measures:

- insert: `ReplayClient.insert` through the node's store actor (reserve, write the shard with its
  CRC-32, commit), first while the RAM tier fills, then sustained with every insert spilling the
  oldest RAM capture to disk and evicting the oldest disk capture;
- sample: `ReplayClient.sample` (actor call, memory map, size check, CRC-32 on the process's first
  read of a shard) plus a copy into preallocated tensors (the trainer's staging buffers), from page
  cache; with a fresh client each time (every read checks the CRC) and with one client (checked once);
- the same captures through the object store: `ray.put` of the tensors and `ray.get` (torch tensors,
  which Ray copies out; and numpy views of the same bits, which it maps, then copied out);
- the budget overshoot: the tiers' file bytes polled by a thread every ~2 ms during the inserts, and
  measured after every insert (must be 0);
- this machine's bounds: memcpy, a write into tmpfs, CRC-32 and an in-kernel file copy.

GB are 1e9 bytes. Run: PYTHONPATH=$PWD python bench/replay_bench.py [--scale 1.0]
Writes bench/results/replay.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch

from bench.common import environment, write_result
from core.distill.capture import Capture, CaptureMeta
from core.distill.ratio_limiter import RatioLimiterConfig
from core.distill.replay_policy import ReplayPolicyConfig
from runner.replay import ReplayConfig, client_for, connect_store, shutdown_store
from runner.replay.shards import capture_batch, shard_size
from runner.replay.tier_files import dir_bytes

REPO = Path(__file__).resolve().parents[1]
GB = 1e9
MiB = 2**20


@dataclass(frozen=True)
class Case:
    name: str
    heads: int
    dim: int
    tokens: int
    queries: int
    latent: int  # image tokens per side
    text: int
    captures: int  # inserted (at --scale 1)
    ram_bytes: int
    disk_bytes: int
    samples: int  # sample calls
    batch: int  # captures per sample call (a trainer's batch)


CASES = (
    Case("flux_1024", 24, 128, 4608, 128, 64, 512, 40, 1024 * MiB, 1024 * MiB, 24, 1),
    Case("flux_2048", 24, 128, 16896, 128, 128, 512, 12, 1024 * MiB, 1024 * MiB, 10, 1),
    Case("reference_256", 6, 64, 260, 128, 16, 4, 300, 64 * MiB, 64 * MiB, 40, 8),
    Case("reference_512", 6, 64, 1028, 128, 32, 4, 150, 64 * MiB, 64 * MiB, 30, 8),
)


def captures_for(case: Case, n: int) -> list[Capture]:
    """n distinct seeded bf16 captures of the case's shape (reused round-robin by the inserts)."""
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)

        def t(tokens: int, g: torch.Generator = g) -> torch.Tensor:
            return torch.randn(1, case.heads, tokens, case.dim, generator=g).to(torch.bfloat16)

        meta = CaptureMeta(
            layer="single:0",
            step=i,
            sigma=0.5,
            cfg=3.5,
            text_len=case.text,
            latent_h=case.latent,
            latent_w=case.latent,
            prompt_id=i,
            seed_id=0,
        )
        index = torch.linspace(0, case.tokens - 1, case.queries).round().long()
        out.append(
            Capture(meta=meta, q_sub=t(case.queries), k=t(case.tokens), v=t(case.tokens),
                    teacher_sub=t(case.queries), query_index=index)
        )  # fmt: skip
    return out


class Watcher:
    """Polls the tiers' shard bytes (as the filesystem reports them) and keeps the peak of each."""

    def __init__(self, dirs: dict[str, Path]) -> None:
        self.dirs = dirs
        self.peak = dict.fromkeys(dirs, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for tier, d in self.dirs.items():
                self.peak[tier] = max(self.peak[tier], dir_bytes(d))
            time.sleep(0.002)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_case(case: Case, scale: float, ram_root: Path, disk_root: Path) -> dict:
    n_insert = max(4, round(case.captures * scale))
    pool = captures_for(case, 3)
    nbytes = shard_size(capture_batch(pool[0], 0))
    ram_dir, disk_dir = ram_root / case.name, disk_root / case.name
    cfg = ReplayConfig(
        ram_dir=str(ram_dir),
        disk_dir=str(disk_dir),
        policy=ReplayPolicyConfig(
            ram_bytes=case.ram_bytes,
            disk_bytes=case.disk_bytes,
            limiter=RatioLimiterConfig(samples_per_insert=1, error_buffer=1e12),  # never limits here
        ),
    )
    handle = connect_store(cfg)
    client = client_for(handle)
    ram_slots = case.ram_bytes // nbytes
    watcher = Watcher({"ram": ram_dir, "disk": disk_dir})
    fill_s, sustained_s, fill_n, after_write_over = 0.0, 0.0, 0, {"ram": 0, "disk": 0}
    try:
        for i in range(n_insert):
            cap = pool[i % len(pool)]
            t0 = time.perf_counter()
            client.insert(cap)
            dt = time.perf_counter() - t0
            if i < ram_slots:
                fill_s, fill_n = fill_s + dt, fill_n + 1
            else:
                sustained_s += dt
            for tier, (measured, _, budget) in ray.get(handle.audit.remote()).items():
                after_write_over[tier] = max(after_write_over[tier], measured - budget)
    finally:
        peak = watcher.stop()
    counters = client.stats().counters
    fields = ("q_sub", "k", "v", "teacher_sub", "query_index")
    dst = [[torch.empty_like(getattr(pool[0], f)) for f in fields] for _ in range(case.batch)]
    insert_ms = 1e3 * (fill_s + sustained_s) / n_insert

    def sample_into(c) -> float:
        t0 = time.perf_counter()
        got = c.sample("single:0", case.batch)
        for buffers, s in zip(dst, got, strict=True):
            for d, f in zip(buffers, fields, strict=True):
                d.copy_(getattr(s.capture, f))
        return time.perf_counter() - t0

    # Cold: a fresh client per call maps each shard anew and checks its CRC-32. Warm: one client that
    # keeps every shard mapped (its cache covers the store) and has checked each once.
    cold_s = sum(sample_into(client_for(handle)) for _ in range(case.samples))
    warm = client_for(handle, map_cache_bytes=case.ram_bytes + case.disk_bytes)
    held, seen = warm.stats().policy["captures"], set()
    for _ in range(20 * held):  # until this client has mapped (and checked) every capture once
        seen.update(s.ref.order for s in warm.sample("single:0", case.batch))
        if len(seen) == held:
            break
    warm_times = [sample_into(warm) for _ in range(case.samples)]
    warm_s = sum(warm_times)
    actor_ms = statistics.median(_timed(lambda: ray.get(handle.config.remote())) for _ in range(50)) * 1e3
    shutdown_store(handle)

    obj = object_store_path(
        pool, n_insert, case.samples * case.batch, budget=case.ram_bytes + case.disk_bytes
    )
    sustained_n = n_insert - fill_n
    row = {
        "case": case.name,
        "shape": {"heads": case.heads, "head_dim": case.dim, "tokens": case.tokens, "queries": case.queries},
        "capture_bytes": nbytes,
        "captures_inserted": n_insert,
        "inserted_bytes": n_insert * nbytes,
        "ram_budget": case.ram_bytes,
        "disk_budget": case.disk_bytes,
        "insert_ram_fill_GBps": round(fill_n * nbytes / fill_s / GB, 3),
        "insert_sustained_GBps": round(sustained_n * nbytes / sustained_s / GB, 3) if sustained_n else None,
        "insert_all_GBps": round(n_insert * nbytes / (fill_s + sustained_s) / GB, 3),
        "insert_ms_mean": round(insert_ms, 2),
        "sample_batch": case.batch,
        "sample_cold_GBps": round(case.samples * case.batch * nbytes / cold_s / GB, 3),
        "sample_GBps": round(case.samples * case.batch * nbytes / warm_s / GB, 3),
        "sample_call_ms_median": round(statistics.median(warm_times) * 1e3, 2),
        "actor_round_trip_ms_median": round(actor_ms, 2),
        "spilled": counters.spilled,
        "evicted": counters.evicted,
        "overshoot_bytes_polled": {
            t: max(0, peak[t] - b) for t, b in (("ram", case.ram_bytes), ("disk", case.disk_bytes))
        },
        "overshoot_bytes_after_each_write": {t: max(0, v) for t, v in after_write_over.items()},
        "peak_bytes_polled": peak,
        **obj,
    }
    row["insert_vs_object_store_put"] = round(row["insert_all_GBps"] / obj["object_store_put_torch_GBps"], 2)
    row["sample_vs_object_store_get"] = round(row["sample_GBps"] / obj["object_store_get_torch_GBps"], 2)
    row["sample_vs_object_store_get_numpy"] = round(
        row["sample_GBps"] / obj["object_store_get_numpy_GBps"], 2
    )
    return row


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def object_store_path(pool: list[Capture], n_insert: int, samples: int, *, budget: int) -> dict:
    """The same captures as Ray objects: put (keeping at most `budget` bytes referenced, oldest
    dropped first, as the store does) and get (torch: Ray copies out; numpy: mapped, then copied)."""
    fields = ("q_sub", "k", "v", "teacher_sub", "query_index")
    nbytes = sum(getattr(pool[0], f).nbytes for f in fields)
    out = {}
    for kind in ("torch", "numpy"):

        def payload(c: Capture, kind: str = kind):
            ts = [getattr(c, f) for f in fields]
            return (
                ts
                if kind == "torch"
                else [t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy() for t in ts]
            )

        held: deque = deque()
        put_s = 0.0
        for i in range(n_insert):
            p = payload(pool[i % len(pool)])
            t0 = time.perf_counter()
            held.append(ray.put(p))
            put_s += time.perf_counter() - t0
            while len(held) * nbytes > budget:
                held.popleft()
        dst = [torch.empty_like(getattr(pool[0], f)) for f in fields]
        get_s = 0.0
        for j in range(samples):
            ref = held[j % len(held)]
            t0 = time.perf_counter()
            got = ray.get(ref)
            if kind == "numpy":  # zero-copy read-only views of the object: copy out like the store path
                for d, a in zip(dst, got, strict=True):
                    np.copyto(d.view(torch.int16 if d.dtype == torch.bfloat16 else d.dtype).numpy(), a)
            get_s += time.perf_counter() - t0
            del got
        held.clear()
        out[f"object_store_put_{kind}_GBps"] = round(n_insert * nbytes / put_s / GB, 3)
        out[f"object_store_get_{kind}_GBps"] = round(samples * nbytes / get_s / GB, 3)
    return out


def machine_bounds(ram_root: Path, disk_root: Path) -> dict:
    """memcpy, tmpfs write, CRC-32 and an in-kernel tmpfs -> disk copy, 256 MiB, best of 3."""
    src = torch.randint(0, 2**15, (128 * MiB,), dtype=torch.int16)
    dst = torch.empty_like(src)
    view = memoryview(src.numpy()).cast("B")

    def best(fn) -> float:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return round(view.nbytes / min(times) / GB, 3)

    a, b = ram_root / "bound.bin", disk_root / "bound.bin"

    def write_tmpfs() -> None:
        a.unlink(missing_ok=True)
        fd = os.open(a, os.O_WRONLY | os.O_CREAT, 0o644)
        m = view
        while m.nbytes:
            m = m[os.write(fd, m) :]
        os.close(fd)

    out = {
        "memcpy_GBps": best(lambda: dst.copy_(src)),
        "tmpfs_write_GBps": best(write_tmpfs),
        "crc32_GBps": best(lambda: zlib.crc32(view)),
        "tmpfs_to_disk_copy_GBps": best(lambda: shutil.copyfile(a, b)),
    }
    a.unlink()
    b.unlink()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the captures to insert")
    parser.add_argument("--cases", default=",".join(c.name for c in CASES))
    args = parser.parse_args()
    shm = Path("/dev/shm")
    ram_root = Path(tempfile.mkdtemp(prefix="tessera-replay-bench-", dir=shm if shm.is_dir() else None))
    disk_root = Path(tempfile.mkdtemp(prefix="tessera-replay-bench-"))
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=int(2.5 * 2**30),
        namespace="tessera",
        runtime_env={"env_vars": env},
    )
    load_before = os.getloadavg()
    try:
        bounds = machine_bounds(ram_root, disk_root)
        print("machine:", bounds, flush=True)
        rows = []
        for case in (c for c in CASES if c.name in args.cases.split(",")):
            row = run_case(case, args.scale, ram_root, disk_root)
            print(row, flush=True)
            rows.append(row)
    finally:
        ray.shutdown()
        shutil.rmtree(ram_root, ignore_errors=True)
        shutil.rmtree(disk_root, ignore_errors=True)
    overshoot = max(
        v
        for r in rows
        for key in ("overshoot_bytes_polled", "overshoot_bytes_after_each_write")
        for v in r[key].values()
    )
    result = {
        "bench": "replay",
        "env": environment(),
        "scale": args.scale,
        "machine": bounds,
        # The host is shared: 1-minute load averages at the start and the end of the run (2 cores).
        "load_average_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "targets": {"overshoot_bytes": 0, "insert_GBps": 1.0, "sample_GBps": 2.0},
        "max_overshoot_bytes": overshoot,
        "rows": rows,
        "median_sample_vs_object_store_get": statistics.median(r["sample_vs_object_store_get"] for r in rows),
    }
    print("wrote", write_result("replay", result))


if __name__ == "__main__":
    main()
