"""Does the dispatcher keep N workers busy? A simulation on fake GPUs, for hosts we cannot rent.

    python bench/simulate_workers.py --workers 1,2,4,8 --view-s 0.17

A local Ray with 8 fake GPUs runs the real pool, dispatcher and upscale task with the tiny model;
each worker is a ModelWorker whose forward also holds its device lock for `view_s` seconds per view
(the measured H200 time of a 1024 px Flux.1-dev view, bench/results/forward_floor.json), so the
dispatch, transport, batching and fusion are real and only the GPU is simulated. The phase has 25
views per step, like the 2048 -> 4096 px phase of the GPU benchmarks (5 x 5 tiles).
Reports per worker count: denoise time, speedup, the granularity bound ceil(views / N), and the
busy fraction of each worker.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, write_result  # noqa: E402
from runner.pool.worker import ModelWorker  # noqa: E402


class SimulatedDeviceWorker(ModelWorker):
    """A ModelWorker whose device takes `view_s` seconds per view (simulated GPU time)."""

    view_s = float(os.environ.get("TESSERA_SIM_VIEW_S", "0.17"))

    def _forward(self, cond, x, sigma, rope, splits):
        v = super()._forward(cond, x, sigma, rope, splits)
        time.sleep(self.view_s * x.shape[0])  # the caller holds the device lock
        return v


def sim_job(tmp: Path, workers: int, steps: int) -> dict:
    """One 256 -> 512 px phase of 128 px tiles (25 views a step) on `workers` simulated GPUs."""
    return {
        "task": "upscale",
        "output": str(tmp / f"w{workers}"),
        "pool": {"name": "sim", "workers": workers, "gpus_per_worker": 1, "max_batch": 1},
        "model": {"kind": "random", "shape": "tiny"},
        "image": str(tmp / "in.png"),
        "target": [512, 512],
        "phases": 1,
        "steps": steps,
        "denoise": [1.0],
        "skip_residual": None,
        "coherence": {"dilated": 0},
        "tiling": {"method": "multidiffusion", "tile": 128, "overlap": 32},
        "outputs": {"phase_images": False, "latent_stats": False, "compare_bicubic": False},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="1,2,4,8")
    p.add_argument("--view-s", type=float, default=0.17)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    os.environ["TESSERA_SIM_VIEW_S"] = str(args.view_s)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray
    from PIL import Image

    from core.models.loading import ModelSpec
    from runner.config import PoolConfig
    from runner.pool.pool import connect_pool, shutdown_pool
    from runner.ray_init import REPO_ROOT
    from runner.run import run_job

    counts = [int(v) for v in args.workers.split(",")]
    ray.init(
        namespace="tessera",
        num_cpus=max(counts) + 1,
        num_gpus=max(counts),
        include_dashboard=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT), "TESSERA_SIM_VIEW_S": str(args.view_s)}},
    )
    tmp = Path(tempfile.mkdtemp(prefix="tessera-sim-"))
    Image.effect_mandelbrot((256, 256), (-2, -1.2, 1, 1.2), 64).convert("RGB").save(tmp / "in.png")
    spec = ModelSpec(kind="random", shape="tiny")
    pool_cfg = PoolConfig(name="sim", workers=max(counts), gpus_per_worker=1)
    pool = connect_pool(pool_cfg, spec, worker_cls=SimulatedDeviceWorker)  # all workers up before timing
    runs = []
    for n in counts:
        job = sim_job(tmp, n, args.steps)
        (tmp / f"w{n}.yaml").write_text(yaml.safe_dump(job))
        record = run_job(tmp / f"w{n}.yaml", stream=open(os.devnull, "w"))[0].record
        views = record["records"]["views_per_step"]["phase1"]
        denoise = record["timings"]["denoise_s"]
        busy = record["pool"]["worker_busy_s"]
        runs.append(
            {
                "workers": n,
                "views_per_step": views[0],
                "steps": len(views),
                "denoise_s": round(denoise, 3),
                "simulated_device_s_total": round(args.view_s * sum(views), 3),
                "granularity_bound_speedup": round(views[0] / math.ceil(views[0] / n), 3),
                "busy_fraction": {k: round(v / denoise, 3) for k, v in busy.items()},
                "dispatch_overhead_s": record["pool"]["dispatch_overhead_s"],
            }
        )
        print(runs[-1], flush=True)
    base = runs[0]["denoise_s"] * runs[0]["workers"]
    for r in runs:
        r["speedup"] = round(base / r["denoise_s"], 3)
        r["efficiency_vs_granularity_bound"] = round(r["speedup"] / r["granularity_bound_speedup"], 3)
    shutdown_pool(pool)
    write_result(
        "simulated_workers",
        {"bench": "simulated_workers", "env": environment(), "view_s": args.view_s, "runs": runs,
         "note": "fake GPUs; each view holds the worker's device lock view_s seconds (simulated H200 "
         "1024 px Flux.1-dev forward); dispatch, transport, batching and fusion are real"},
    )  # fmt: skip


if __name__ == "__main__":
    main()
