"""GPU benchmarks of the upscale path with a Flux.1-dev-shaped transformer (random bf16 weights).

    python bench/upscale_bench.py floor phase whole oom --workers 1          # one GPU
    python bench/upscale_bench.py phase --workers 1,2 --name scaling         # one host, 1 and 2 GPUs
    python bench/upscale_bench.py floor phase --small                        # CPU smoke test, tiny model

floor: bare forward time of one view at 1024/1536/2048 px, batch 1 and the worker's batch, and peak
       memory (the floor every job time is compared with).
phase: a tiled 2048 -> 4096 px phase through the pool (20 steps, denoise 0.6, 1024 px MultiDiffusion
       tiles): job time / (view evaluations x bare forward time), and where the rest goes. With
       several worker counts: speedup and efficiency (P2).
whole: 1024 -> 2048 -> 4096 progressive (skip residual, dilated views, tiled VAE) against a direct
       4096 px 28-step full-frame generation by the same transformer (P3), extrapolated from timed
       full-frame forwards.
direct: that direct generation run as a real job: 28 full-frame steps from noise, then tiled decode.
oom:   the out-of-memory fallback on purpose: a worker capped (memory fraction) below what its
       batches need, so batches split; the split is recorded in job.json.
routed: the direct generation (--direct-steps steps) and the whole progressive job, each with SDPA
       and with every layer routed to students (bench/speed_students.py: untrained, speed only) on
       the views of at least --min-side px (smaller views keep SDPA, where it is faster): job-time
       ratios and the route counters.
Results: bench/results/<name>.json (and $OUT/<name>.json on the device machine).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import BenchWorker, environment, stats, write_result  # noqa: E402

FLUX = {"kind": "random", "shape": "flux-dev"}
QUIET = {"phase_images": False, "latent_stats": False, "compare_bicubic": False, "checkpoints": False}
TINY = {"kind": "random", "shape": "tiny"}


def synthetic_image(path: Path, size: int) -> str:
    """A smooth-plus-detail test image (content does not matter for timing with random weights)."""
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    g = torch.Generator().manual_seed(0)
    rgb = torch.stack([0.5 + 0.4 * torch.sin(6.28 * (k + 1) * x + 3 * y) for k in range(3)])
    rgb = (rgb + 0.05 * torch.randn(3, size, size, generator=g)).clamp(0, 1)
    arr = (rgb.permute(1, 2, 0) * 255).round().byte().numpy()
    Image.fromarray(arr).save(path)
    return str(path)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.small = args.small
        self.model = TINY if self.small else FLUX
        self.px = (lambda v: v // 16) if self.small else (lambda v: v)  # sizes scale down 16x on CPU
        self.tmp = Path(tempfile.mkdtemp(prefix="tessera-bench-"))
        self.env = environment()

    def connect(self, pool_fields: dict, model: dict):
        """The benchmark's pool, found or created with BenchWorker actors (time_forward and memory
        resets), so the jobs run on the workers the floors are timed on."""
        from core.models.loading import ModelSpec
        from runner.config import PoolConfig
        from runner.pool.pool import connect_pool

        return connect_pool(PoolConfig(**pool_fields), ModelSpec(**model), worker_cls=BenchWorker)

    def job(self, name: str, fields: dict, overrides: list[str]) -> dict:
        from runner.run import run_job

        self.connect(fields["pool"], fields["model"])  # before the job: a pool of BenchWorkers
        path = self.tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"task": "upscale", "output": str(self.tmp / name), **fields}))
        outcome = run_job(path, overrides)[-1]
        return outcome.record

    def job_4096(self, image: str, workers: int = 1, **fields) -> dict:
        """A 4096 px job on the benchmark model: what every P1-P3 job shares, plus `fields`."""
        return {
            "pool": self.pool_fields(workers),
            "model": self.model,
            "image": image,
            "target": [self.px(4096), self.px(4096)],
            "vae_tile": max(64, self.px(1024)),
            "outputs": QUIET,
            **fields,
        }

    def pool_fields(self, workers: int, **extra) -> dict:
        gpus = 1.0 if torch.cuda.is_available() else 0.5
        return {"name": "bench", "workers": workers, "gpus_per_worker": gpus, "max_in_flight": 2} | extra

    def floor(self, shape_px: int, batch: int, reps: int = 5, warmup: int = 2, pause_s: float = 0.0) -> dict:
        import ray

        from runner.config import PoolConfig
        from runner.pool.ray_pool import RayModelPool

        pool = self.connect(self.pool_fields(1), self.model)
        rp = RayModelPool(pool, PoolConfig(**self.pool_fields(1)), job="floor")
        rp.cond()
        lat = shape_px // 8
        c = rp.latent_channels
        out = ray.get(
            pool.workers[0].time_forward.remote(
                "floor", (c, lat, lat), batch, warmup=warmup, reps=reps, pause_s=pause_s
            )
        )
        rp.close()
        per_view = [t / batch for t in out.pop("times_s")]
        return {"px": shape_px, "batch": batch, "per_view": stats(per_view), "per_view_s": per_view, **out}

    def floor_around(self, run: Callable[[], dict]) -> tuple[dict, dict]:
        """(run's record, floor): the bare 1024 px forward timed just before and just after `run`, so
        the floor sees the GPU both as it starts the job and as the job leaves it (clocks, heat)."""
        px = self.px(1024)
        batch = self.max_batch(px)
        before = self.floor(px, batch, reps=10)
        record = run()
        after = self.floor(px, batch, reps=10)
        # the same forwards with the device idle 60 ms before each, as at a tiled step's barrier
        paused = self.floor(px, batch, reps=10, pause_s=0.06)
        both = stats(before["per_view_s"] + after["per_view_s"])
        return record, {
            "median_s": both["median_s"],
            "all": both,
            "before": before["per_view"],
            "after": after["per_view"],
            "after_60ms_idle_each": paused["per_view"],
            "batch": batch,
        }

    def max_batch(self, shape_px: int) -> int:
        import ray

        pool = self.connect(self.pool_fields(1), self.model)
        lat = shape_px // 8
        return ray.get(pool.workers[0].max_batch.remote((16 if not self.small else 32, lat, lat)))


def release_pool(name: str, size: int = 8) -> None:
    import ray

    for i in range(size):
        try:
            ray.kill(ray.get_actor(f"{name}-{i}", namespace="tessera"))
        except ValueError:
            pass


def run_floor(b: Bench) -> dict:
    rows = []
    for px in (1024, 1536, 2048):
        size = b.px(px) if b.small else px
        batch = b.max_batch(size)
        for bs in sorted({1, batch}):
            rows.append(b.floor(size, bs))
            print(f"floor {size}px batch {bs}: {rows[-1]['per_view']['median_s']:.4f} s/view", flush=True)
    return {
        "bench": "forward_floor",
        "env": b.env,
        "model": b.model,
        "dtype": "bfloat16",
        "attention": "SDPA",
        "text_tokens": 512,
        "rows": rows,
    }


def phase_fields(b: Bench, workers: int, image: str) -> dict:
    return b.job_4096(
        image,
        workers,
        phases=1,
        steps=20,
        denoise=[0.6],
        coherence={"dilated": 0},
        tiling={"method": "multidiffusion", "tile": b.px(1024), "overlap": b.px(256)},
    )


def breakdown(record: dict, floor_s: float) -> dict:
    t, pool = record["timings"], record["pool"]
    views = pool["views"]
    ideal = views * floor_s
    denoise = t.get("denoise_s", 0.0)
    evaluate = pool["evaluate_wall_s"]
    job = t["total_s"] - t.get("pool_connect_s", 0.0)
    return {
        "views": views,
        "bare_forward_s": floor_s,
        "model_floor_s": round(ideal, 3),
        "job_s": round(job, 3),
        "p1_job_over_floor": round(job / ideal, 4),
        "denoise_s": round(denoise, 3),
        "denoise_over_floor": round(denoise / ideal, 4),
        "runner_overhead_pct": round(100 * (denoise - ideal) / ideal, 2),
        # the same against the forwards as the job ran them (one worker: its device clock's sum)
        "overhead_vs_in_job_forwards_pct": round(
            100 * (denoise - pool.get("forward_s", 0.0)) / max(pool.get("forward_s", 0.0), 1e-9), 2
        ),
        "in_job_forward_s": pool.get("forward_s"),
        "where": {
            "in_job_forwards_above_floor_s": round(pool.get("forward_s", 0.0) - ideal, 3),
            "worker_transfers_s": round(pool["model_s"] - pool.get("forward_s", 0.0), 3),
            "dispatch_s": pool["dispatch_overhead_s"],
            "plans_blending_mixing_s": round(denoise - evaluate, 3),
            "vae_encode_s": t.get("vae_encode_s"),
            "vae_decode_s": t.get("vae_decode_s"),
            "resize_s": t.get("resize_s"),
            "pool_connect_s": t.get("pool_connect_s"),
        },
        "views_per_step": record["records"]["views_per_step"],
        "step_wall_s_by_views": pool.get("evaluate_call_s_by_views"),
        "worker_busy_s": pool["worker_busy_s"],
        "worker_memory": pool.get("worker_memory"),
        "worker_info": [
            {k: w[k] for k in ("index", "gpu_ids", "device_name", "host")} for w in pool["workers"]
        ],
        "batch_size_by_shape": pool["batch_size_by_shape"],
        "fallbacks": record["fallbacks"],
    }


def run_phase(b: Bench, workers: list[int]) -> dict:
    image = synthetic_image(b.tmp / "in2048.png", b.px(2048))
    runs = []
    for i, n in enumerate(workers):
        job = functools.partial(b.job, f"phase-{i}-w{n}", phase_fields(b, n, image), [])
        record, floor = b.floor_around(job)
        runs.append({"workers": n, "floor": floor, **breakdown(record, floor["median_s"])})
        print(
            f"phase workers={n}: job {runs[-1]['job_s']} s, denoise {runs[-1]['denoise_s']} s, "
            f"overhead {runs[-1]['runner_overhead_pct']} %",
            flush=True,
        )
    out = {
        "bench": "upscale_phase",
        "env": b.env,
        "model": b.model,
        "config": phase_fields(b, 1, "in2048.png"),
        "runs": runs,
    }
    if len(runs) > 1:
        base = runs[0]
        out["scaling"] = [
            {
                "workers": r["workers"],
                "speedup_denoise": round(base["denoise_s"] / r["denoise_s"], 3),
                "speedup_job": round(base["job_s"] / r["job_s"], 3),
                "efficiency_denoise": round(
                    base["denoise_s"] / r["denoise_s"] / (r["workers"] / base["workers"]), 3
                ),
                "ideal_speedup_by_views_per_step": round(
                    (lambda v, n: v / math.ceil(v / n))(base["views_per_step"]["phase1"][0], r["workers"])
                    / (lambda v, n: v / math.ceil(v / n))(
                        base["views_per_step"]["phase1"][0], base["workers"]
                    ),
                    3,
                ),
            }
            for r in runs
        ]
    return out


def run_whole(b: Bench) -> dict:
    import ray

    from runner.config import PoolConfig
    from runner.pool.ray_pool import RayModelPool

    image = synthetic_image(b.tmp / "in1024.png", b.px(1024))
    fields = b.job_4096(
        image,
        steps=20,
        denoise=[0.6, 0.4],
        coherence={"dilated": "auto"},
        tiling={"method": "multidiffusion", "tile": b.px(1024), "overlap": b.px(256)},
    )
    record, floor_info = b.floor_around(lambda: b.job("whole", fields, []))
    floor = floor_info["median_s"]
    # The direct generation: 28 full-frame forwards at 4096 px (one view per step), timed over a few.
    pool = b.connect(b.pool_fields(1), b.model)
    rp = RayModelPool(pool, PoolConfig(**b.pool_fields(1)), job="direct")
    rp.cond()
    lat = b.px(4096) // 8
    full = ray.get(
        pool.workers[0].time_forward.remote("direct", (rp.latent_channels, lat, lat), 1, warmup=1, reps=2)
    )
    rp.close()
    step = stats(full["times_s"])
    direct_denoise = 28 * step["median_s"]
    decode = record["timings"].get("vae_decode_s", 0.0)
    job = record["timings"]["total_s"] - record["timings"].get("pool_connect_s", 0.0)
    return {
        "bench": "whole_job",
        "env": b.env,
        "model": b.model,
        "config": {**fields, "image": "in1024.png"},
        "progressive": {"floor": floor_info, **breakdown(record, floor)},
        "direct_4096": {
            "full_frame_forward": step,
            "peak_allocated_gib": full.get("peak_allocated_gib"),
            "steps": 28,
            "denoise_s_extrapolated": round(direct_denoise, 2),
            "with_same_tiled_decode_s": round(direct_denoise + decode, 2),
            "note": "28 x the median full-frame forward (measured over 2 after 1 warm-up), plus the "
            "progressive job's own tiled decode time for the decode",
        },
        "progressive_job_s": round(job, 2),
        "speedup_vs_direct": round((direct_denoise + decode) / job, 3),
    }


def run_direct(b: Bench) -> dict:
    """P3's baseline as a real job: a direct 4096 px generation, 28 full-frame steps (one view per
    step, DyPE past the native size) from pure noise (denoise 1.0), then the same tiled decode."""
    fields = b.job_4096(
        synthetic_image(b.tmp / "in4096.png", b.px(4096)),
        phases=1,
        steps=28,
        denoise=[1.0],
        skip_residual=None,
        coherence={"dilated": 0},
        tiling={"method": "none"},
    )
    record = b.job("direct", fields, [])
    t, pool = record["timings"], record["pool"]
    job = t["total_s"] - t.get("pool_connect_s", 0.0)
    return {
        "bench": "direct_4096",
        "env": b.env,
        "model": b.model,
        "config": {**fields, "image": "in4096.png"},
        "views": pool["views"],
        "views_per_step": record["records"]["views_per_step"],
        "step_wall_s_by_views": pool.get("evaluate_call_s_by_views"),
        "job_s": round(job, 3),
        "denoise_s": t.get("denoise_s"),
        "vae_encode_s": t.get("vae_encode_s"),
        "vae_decode_s": t.get("vae_decode_s"),
        "generation_s": round(job - (t.get("vae_encode_s") or 0.0), 3),
        "note": "generation_s leaves out the input's encode, which a text-to-image run does not need",
        "worker_memory": pool.get("worker_memory"),
        "fallbacks": record["fallbacks"],
    }


def oom_probe(b: Bench, model: dict, tile: int, out_px: int) -> dict:
    """On one uncapped worker: the weights, one view's and one untiled decode's memory (GiB), and
    the memory fraction and batch size that make the job's batches (not the VAE) run out of memory."""
    import ray

    from runner.config import PoolConfig
    from runner.pool.pool import shutdown_pool
    from runner.pool.ray_pool import RayModelPool

    pool = b.connect(b.pool_fields(1, name="oom-probe"), model)
    rp = RayModelPool(pool, PoolConfig(**b.pool_fields(1, name="oom-probe")), job="probe")
    rp.cond()
    w = pool.workers[0]
    lat = tile // 8
    one = ray.get(w.time_forward.remote("probe", (rp.latent_channels, lat, lat), 1, warmup=1, reps=1))
    base = ray.get(w.memory.remote())
    ray.get(w.reset_peak_memory.remote())
    ray.get(w.decode.remote(torch.randn(1, rp.latent_channels, out_px // 8, out_px // 8)))
    vae_peak = ray.get(w.memory.remote())
    rp.close()
    shutdown_pool(pool)
    total = base.get("total_gib", 0)
    weights = base.get("allocated_gib", 0)
    per_view = max(one.get("peak_allocated_gib", 0) - weights, 1e-3)
    vae_need = max(vae_peak.get("peak_allocated_gib", 0) - weights, 0.0)
    headroom = max(vae_need * 1.3 + 0.5, per_view * 3)
    return {
        "weights_gib": weights,
        "per_view_gib": round(per_view, 3),
        "vae_decode_gib": round(vae_need, 3),
        "total_gib": total,
        "memory_fraction": round(min(0.98, (weights + headroom + 1.0) / total) if total else 1.0, 4),
        "max_batch": max(4, min(49, math.ceil(2.5 * headroom / per_view))),
    }


def run_oom(b: Bench) -> dict:
    """Cap a worker's memory below what its batches need; the batches split and job.json says so."""
    # The Flux.1-dev transformer on TAEF2 latents: the VAE's full-resolution activations (9.5 GiB for a
    # 2048 px decode with Flux's AutoencoderKL, measured) would otherwise need more memory than any
    # batch of views, and no cap could make a batch fail while the VAE still fits.
    model = {**b.model, "vae": "taef2"}
    release_pool("bench")  # free the GPUs the other measurements' workers hold
    tile, out_px = b.px(512), b.px(2048)
    probe = oom_probe(b, model, tile, out_px)
    batch, fraction = probe["max_batch"], probe["memory_fraction"]
    fields = {
        "pool": {
            **b.pool_fields(1),
            "name": "oom",
            "max_batch": batch,
            "gpu_memory_fraction": fraction,
        },
        "model": model,
        "image": synthetic_image(b.tmp / "in_oom.png", out_px),
        "target": [out_px, out_px],
        "phases": 1,
        "steps": 4,
        "denoise": [0.5],
        "skip_residual": None,
        "coherence": {"dilated": 0},
        "tiling": {"method": "multidiffusion", "tile": tile, "overlap": tile // 2},
        "vae_tile": 0,
        "outputs": QUIET,
    }
    record = b.job("oom", fields, [])
    return {
        "bench": "oom_fallback",
        "env": b.env,
        "probe": probe,
        "fallbacks": record["fallbacks"],
        "status": record["status"],
        "views_per_step": record["records"]["views_per_step"],
        "worker_memory": record["pool"].get("worker_memory"),
        "unit_gib": 1024**3,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="+", choices=["floor", "phase", "whole", "direct", "oom", "routed"])
    p.add_argument("--direct-steps", type=int, default=28, help="steps of `routed`'s direct generation")
    p.add_argument("--min-side", type=int, default=2048, help="`routed`: smallest view side given students")
    p.add_argument("--workers", default="1", help="comma list of worker counts for `phase`")
    p.add_argument("--name", default="", help="result name for `phase` (default runner_overhead / scaling)")
    p.add_argument("--small", action="store_true", help="CPU smoke test: tiny model, sizes / 16")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from runner.ray_init import init_ray

    init_ray()
    b = Bench(args)
    suffix = "_small" if args.small else ""
    started = time.perf_counter()
    for what in dict.fromkeys(args.what):  # in the order given
        if what == "floor":
            write_result("forward_floor" + suffix, run_floor(b))
        elif what == "phase":
            workers = [int(v) for v in args.workers.split(",")]
            name = args.name or ("scaling" if len(workers) > 1 else "runner_overhead")
            write_result(name + suffix, run_phase(b, workers))
        elif what == "whole":
            write_result("whole_job" + suffix, run_whole(b))
        elif what == "direct":
            write_result("direct_4096" + suffix, run_direct(b))
        elif what == "oom":
            write_result("oom_fallback" + suffix, run_oom(b))
        elif what == "routed":
            from bench.upscale_routed import run_routed

            write_result("upscale_routed" + suffix, run_routed(b, synthetic_image))
    print(f"bench done in {time.perf_counter() - started:.1f} s", flush=True)


if __name__ == "__main__":
    main()
