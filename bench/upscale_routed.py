"""`bench/upscale_bench.py routed`: the direct 4096 px generation and the progressive job, each with
SDPA and with every layer routed to students on the views of at least --min-side px.

The students come from `bench/speed_students.py` (untrained, marked ready: speed only). Smaller
views keep SDPA by `attention.min_image_tokens`, where it is faster. Writes job-time ratios and the
route counters; `b` is upscale_bench's `Bench` (its pool of BenchWorkers and job runner).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def routed_pair(b, name: str, fields: dict, attention: dict) -> dict:
    """One job with SDPA and with students routed: job times (less the pool connect) and counters."""
    out = {}
    for label, extra in (("sdpa", {}), ("students", {"attention": attention})):
        record = b.job(f"{name}_{label}", {**fields, **extra}, [])
        t = record["timings"]
        out[label] = {
            "job_s": round(t["total_s"] - t.get("pool_connect_s", 0.0), 3),
            "denoise_s": t.get("denoise_s"),
            "vae_decode_s": t.get("vae_decode_s"),
            "views": record["pool"]["views"],
            "attention": record["pool"].get("attention", {}).get("counters", {}).get("total"),
            "fallbacks": record["fallbacks"],
        }
        print(f"{name} {label}: job {out[label]['job_s']} s", flush=True)
    out["job_time_ratio_sdpa_over_students"] = round(out["sdpa"]["job_s"] / out["students"]["job_s"], 3)
    return out


def run_routed(b, synthetic_image: Callable[[Path, int], str]) -> dict:
    from bench.speed_students import speed_bundle

    folder = b.tmp / "speed-students"
    speed_bundle(folder, b.model["shape"])
    min_tokens = (b.px(b.args.min_side) // 16) ** 2  # 8x VAE, 2x2 patches
    attention = {"students": str(folder), "min_image_tokens": min_tokens}
    direct = b.job_4096(
        synthetic_image(b.tmp / "in4096.png", b.px(4096)),
        phases=1, steps=b.args.direct_steps, denoise=[1.0], skip_residual=None,
        coherence={"dilated": 0}, tiling={"method": "none"},
    )  # fmt: skip
    whole = b.job_4096(
        synthetic_image(b.tmp / "in1024.png", b.px(1024)),
        steps=20, denoise=[0.6, 0.4], coherence={"dilated": "auto"},
        tiling={"method": "multidiffusion", "tile": b.px(1024), "overlap": b.px(256)},
    )  # fmt: skip
    return {
        "bench": "upscale_routed",
        "env": b.env,
        "model": b.model,
        "students": "untrained, speed only (bench/speed_students.py)",
        "min_side_px": b.args.min_side,
        "min_image_tokens": min_tokens,
        "direct_4096": {"steps": b.args.direct_steps, **routed_pair(b, "direct", direct, attention)},
        "progressive_1024_to_4096": routed_pair(b, "whole", whole, attention),
    }
