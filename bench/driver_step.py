"""The driver's share of a tiled step, with the model taken out: a 2048 -> 4096 px phase (25 tiles of
1024 px, 12 steps, skip residual) through the real upscale task with a pool whose model is free.

    python bench/driver_step.py --runs 5

Each mode runs in fresh processes (malloc settings are process-wide): `default` and `tuned`
(runner/driver_process.py's malloc thresholds and thread cap). Prints the median denoise-loop time
minus the (free) evaluate time of each mode: the work the GPUs wait for at every step's barrier.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.models.backbone import Cond  # noqa: E402


class FreePool:
    """A pool whose model costs nothing: velocities 0.1 x, latents random, images zero."""

    latent_channels, native_size, vae_scale_factor = 16, 128, 8

    def cond(self) -> Cond:
        return Cond(torch.zeros(4, 8), torch.zeros(8), 3.5)

    def evaluate(self, views):
        return [0.1 * v.x for v in views]

    def encode(self, images, *, tile=0):
        return torch.randn(1, 16, images.shape[-2] // 8, images.shape[-1] // 8)

    def decode(self, latents, *, tile=0):
        return torch.zeros(1, 3, latents.shape[-2] * 8, latents.shape[-1] * 8)

    def summary(self) -> dict:
        return {}


def one_run(tuned: bool) -> float:
    import io

    import yaml
    from PIL import Image

    from runner.config import load_job
    from runner.context import JobArtifacts, JobContext
    from runner.driver_process import keep_freed_memory, limit_driver_threads
    from tasks.upscale import run

    if tuned:
        limit_driver_threads()
        keep_freed_memory()
    tmp = Path(tempfile.mkdtemp(prefix="tessera-driver-"))
    Image.new("RGB", (2048, 2048), (120, 80, 40)).save(tmp / "in.png")
    job = {
        "task": "upscale",
        "output": str(tmp / "out"),
        "image": str(tmp / "in.png"),
        "target": [4096, 4096],
        "phases": 1,
        "steps": 20,
        "denoise": [0.6],
        "coherence": {"dilated": 0},
        "tiling": {"method": "multidiffusion", "tile": 1024, "overlap": 256},
        "outputs": {
            "phase_images": False,
            "latent_stats": False,
            "compare_bicubic": False,
            "checkpoints": False,
        },
    }
    (tmp / "job.yaml").write_text(yaml.safe_dump(job))
    ctx = JobContext(JobArtifacts(tmp / "out", stream=io.StringIO()), FreePool())
    run(load_job(tmp / "job.yaml").config, ctx)
    t = ctx.artifacts.timings
    return t["denoise"] - t.get("evaluate", 0.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--one", choices=["default", "tuned"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(one_run(args.one == "tuned"))
        return
    for mode in ("default", "tuned"):
        times = [
            float(
                subprocess.run(
                    [sys.executable, __file__, "--one", mode], capture_output=True, text=True, check=True
                ).stdout.split()[-1]
            )
            for _ in range(args.runs)
        ]
        spread = sorted(round(t, 3) for t in times)
        print(f"{mode}: driver {statistics.median(times):.3f} s (median of {len(times)}; all {spread})")


if __name__ == "__main__":
    main()
