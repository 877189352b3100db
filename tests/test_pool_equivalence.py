"""In process == on the Ray pool: the whole upscale task, bit for bit.

One job (2 phases, dilated global views, tiled VAE passes, the tiny random model on a crop of a real
photo) runs once through the in-process context and once through `tessera run`'s path on a real
local Ray pool of 2 workers. Both run the same per-batch forward (core/models/forward.py) on the same
batches, the same tiled-VAE round loop (core/vae/lockstep.py) and the same driver code; the
transport keeps every tensor's dtype and bits. So the images must be identical, not merely close.

One condition: the same intra-op thread count for the model. CPU matmul and convolution kernels
split their reductions by thread, so the same job in process with 1 and with 2 torch threads differs
by about 1e-6 (measured). The workers run 1 thread (pool.cpus_per_worker = 1), so the in-process
model runs with 1 thread too.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import ray
import torch
import yaml
from PIL import Image

from runner.config import load_job
from runner.context import JobArtifacts, JobContext, LocalModelPool
from runner.models import load_model
from runner.run import run_job
from tasks.upscale import run

pytestmark = pytest.mark.cpu
POOL = "equiv"


def end_pool(name: str, size: int) -> None:
    """Kill the pool's detached workers that exist (the job may have failed before making them)."""
    for i in range(size):
        try:
            ray.kill(ray.get_actor(f"{name}-{i}", namespace="tessera"))
        except ValueError:
            pass


@pytest.fixture(scope="module")
def job_file(tmp_path_factory, assets) -> Path:
    root = tmp_path_factory.mktemp("equiv")
    crop = root / "crop.png"
    Image.open(assets / "images/eval/set5/bird.png").convert("RGB").crop((100, 100, 180, 164)).save(crop)
    job = {
        "task": "upscale",
        "output": str(root / "ray"),
        "pool": {"name": POOL, "workers": 2, "gpus_per_worker": 0.5, "max_batch": 4},
        "model": {"kind": "random", "shape": "tiny"},
        "image": str(crop),
        "scale": 2.0,
        "phases": 2,
        "steps": 4,
        "denoise": [0.6, 0.4],
        "coherence": {"dilated": 2},
        "tiling": {"method": "multidiffusion", "tile": 64, "overlap": 16},
        "vae_tile": 64,
        "outputs": {"phase_images": False, "latent_stats": False, "compare_bicubic": False},
    }
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def test_upscale_in_process_equals_the_ray_pool_bitwise(ray_cluster, job_file, tmp_path):
    cfg = load_job(job_file).config
    local = LocalModelPool(load_model(cfg.model, "cpu"), max_batch=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers (see the module docstring)
    try:
        expected = run(cfg, JobContext(JobArtifacts(tmp_path / "local", stream=open(os.devnull, "w")), local))
    finally:
        torch.set_num_threads(threads)
    try:
        [outcome] = run_job(job_file, stream=open(os.devnull, "w"))
    finally:
        end_pool(POOL, 2)
    record = outcome.record
    assert record["status"] == "succeeded"
    # the job exercised what this test is about: two phases with dilated views, tiled VAE passes
    # spread over both workers, and views batched on both workers
    views = record["records"]["views_per_step"]
    assert sorted(views) == ["phase1", "phase2"]
    assert record["pool"]["vae_reduction_rounds"] == local.vae_rounds > 0
    assert len(record["pool"]["worker_busy_s"]) == 2
    assert record["pool"]["views"] == local.views == sum(sum(v) for v in views.values())
    image = outcome.result.image
    assert image.shape == expected.image.shape == (1, 3, 128, 160)
    assert torch.equal(image, expected.image)
