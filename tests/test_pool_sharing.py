"""Jobs sharing a pool on one real cluster (the session's `ray start --head`, 2 fake GPUs).

- Two drivers (`tessera run` subprocesses) start at once on a pool that does not exist yet: the
  creation race ends with one set of workers, both jobs succeed, and both images equal the job run
  alone in process.
- A job asking for another model on a pool that serves an active job is refused with a message
  naming the worker, the active job and the differing field (exit code 2, job.json failed); with no
  active job the pool reloads and says so.
- A job's state on a shared worker is its own: another job ending does not clear it.
- Two connect_pool calls racing in one driver create each worker once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from core.models.loading import ModelSpec
from core.tiling.views import ViewInput
from runner.artifacts import write_png
from runner.config import PoolConfig, load_job
from runner.context import JobArtifacts, JobContext, LocalModelPool
from runner.models import load_model
from runner.pool.lifecycle import stop_workers, worker_names
from runner.pool.placement import PoolError
from runner.pool.pool import connect_pool
from runner.pool.ray_pool import RayModelPool
from tasks.upscale import run

pytestmark = pytest.mark.cpu
REPO = Path(__file__).resolve().parents[1]
TINY = ModelSpec(kind="random", shape="tiny")
LIGHT = dict(gpus_per_worker=0.5, cpus_per_worker=0.5)  # several pools fit the session's 4 CPUs


def tessera(*args: str, address: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": address}
    return subprocess.Popen(
        [sys.executable, "-m", "runner", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def job_file(tmp_path_factory, assets) -> Path:
    root = tmp_path_factory.mktemp("sharing")
    crop = root / "crop.png"
    Image.open(assets / "images/eval/set5/bird.png").convert("RGB").crop((100, 100, 164, 148)).save(crop)
    spec = {
        "task": "upscale",
        "output": str(root / "out"),
        "pool": {"name": "shared", "workers": 2, "max_batch": 4, **LIGHT},
        "model": {"kind": "random", "shape": "tiny"},
        "image": str(crop),
        "scale": 2.0,
        "phases": 1,
        "steps": 3,
        "denoise": [0.6],
        "coherence": {"dilated": 0},
        "tiling": {"method": "multidiffusion", "tile": 64, "overlap": 16},
        "vae_tile": 64,
        "outputs": {"phase_images": False, "latent_stats": False, "compare_bicubic": False},
    }
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def alone_in_process(job_file: Path, out: Path) -> np.ndarray:
    """The job's result.png as the job alone, in process at the workers' one torch thread."""
    cfg = load_job(job_file).config
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ctx = JobContext(
            JobArtifacts(out, stream=open(os.devnull, "w")), LocalModelPool(load_model(cfg.model))
        )
        image = run(cfg, ctx).image
    finally:
        torch.set_num_threads(threads)
    write_png(out / "alone.png", image)
    return np.asarray(Image.open(out / "alone.png"))


def test_two_drivers_create_and_share_one_pool(ray_cluster, job_file, tmp_path):
    outs = [tmp_path / "a", tmp_path / "b"]
    procs = [tessera("run", str(job_file), f"output={o}", address=ray_cluster.address) for o in outs]
    try:
        results = [p.communicate(timeout=900) for p in procs]
    finally:
        names = worker_names().get("shared", [])
        stop_workers("shared")
    for proc, (_, stderr) in zip(procs, results, strict=True):
        assert proc.returncode == 0, stderr[-3000:]
    assert [n for _, n in names] == ["shared-0", "shared-1"]  # one set of workers for both jobs
    records = [json.loads((o / "job.json").read_text()) for o in outs]
    assert sum(r["pool"]["pool"]["created"] for r in records) == 2  # each worker created once
    assert {r["pool"]["pool"]["action"] for r in records} <= {"created", "reused", "extended"}
    assert any("pool 'shared': " in out for out, _ in results)  # the console says created or reused
    alone = alone_in_process(job_file, tmp_path / "alone")
    for o in outs:
        assert np.array_equal(np.asarray(Image.open(o / "result.png")), alone)


def test_another_model_on_a_busy_pool_is_refused_and_an_idle_one_reloads(ray_cluster, job_file, tmp_path):
    cfg = PoolConfig(name="busy", workers=1, **LIGHT)
    holder = connect_pool(cfg, TINY)  # an active job on the pool
    try:
        out = tmp_path / "refused"
        proc = tessera(
            "run",
            str(job_file),
            "pool.name=busy",
            "pool.workers=1",
            "model.seed=1",
            f"output={out}",
            address=ray_cluster.address,
        )
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 2, stderr[-3000:]
        assert "Traceback" not in stderr
        assert f"pool worker busy-0 serves model random/tiny to active job(s) {holder.job}" in stderr
        assert "model.seed=1 (served: 0)" in stderr and "pool.name=" in stderr
        record = json.loads((out / "job.json").read_text())
        assert record["status"] == "failed" and record["error"]["type"] == "PoolError"

        ray_end(holder)  # no active job now: the pool reloads for the other model
        other = connect_pool(cfg, ModelSpec(kind="random", shape="tiny", seed=1))
        assert other.facts["action"] == "reused, model reloaded"
        assert other.infos[0]["pid"] == holder.infos[0]["pid"] and other.infos[0]["model"]["seed"] == 1
        with pytest.raises(PoolError, match=r"serves model random/tiny to active job\(s\) " + other.job):
            connect_pool(cfg, TINY)
        ray_end(other)
    finally:
        stop_workers("busy")


def ray_end(pool) -> None:
    import ray

    ray.get([w.end_job.remote(pool.job) for w in pool.workers])


def test_a_jobs_state_survives_another_job_ending(ray_cluster):
    cfg = PoolConfig(name="keyed", workers=1, max_batch=2, **LIGHT)
    pool = connect_pool(cfg, TINY)
    g = torch.Generator().manual_seed(1)
    views = [ViewInput(torch.randn(32, 8, 8, generator=g), 0.5) for _ in range(3)]
    try:
        a = RayModelPool(pool, cfg, job="job-a")
        b = RayModelPool(pool, cfg, job="job-b")
        first = a.evaluate(views)
        second = b.evaluate(views)
        b.close()  # job b ends; job a's conditioning on the shared worker stays
        again = a.evaluate(views)
        a.close()
    finally:
        stop_workers("keyed")
    assert all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(first, second, again, strict=True))
    assert a.dispatcher.stats.requeued == []  # job a never found its state missing


def test_racing_connects_create_each_worker_once(ray_cluster):
    cfg = PoolConfig(name="race", workers=2, **LIGHT)
    try:
        with ThreadPoolExecutor(2) as ex:
            pools = list(ex.map(lambda _: connect_pool(cfg, TINY), range(2)))
        assert sum(p.created for p in pools) == 2
        assert [i["pid"] for i in pools[0].infos] == [i["pid"] for i in pools[1].infos]
        assert [n for _, n in worker_names()["race"]] == ["race-0", "race-1"]
    finally:
        stop_workers("race")
