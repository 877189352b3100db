"""Pool lifecycle on real Ray: `tessera pool list | stop` through the CLI against the session's
`ray start --head` cluster, the idle timeout, a reused pool whose resources changed, and, on a local
Ray that `tessera run` starts itself (no GPU on it), the designed CPU fallback recorded in job.json
and a pool that cannot fit refused before any work, naming the fields."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray
import yaml
from PIL import Image

from core.models.loading import ModelSpec
from runner.config import PoolConfig
from runner.pool.lifecycle import list_pools, stop_workers, worker_names
from runner.pool.placement import PoolError
from runner.pool.pool import connect_pool

pytestmark = pytest.mark.cpu
REPO = Path(__file__).resolve().parents[1]
TINY = ModelSpec(kind="random", shape="tiny")
LIGHT = dict(gpus_per_worker=0.5, cpus_per_worker=0.5)


def tessera(*args: str, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run(
        [sys.executable, "-m", "runner", *args], capture_output=True, text=True, env=full_env, timeout=timeout
    )


def end_job(pool) -> None:
    ray.get([w.end_job.remote(pool.job) for w in pool.workers])


def test_pool_warm_list_and_stop_through_the_cli(ray_cluster, tmp_path):
    at = {"RAY_ADDRESS": ray_cluster.address}
    busy = connect_pool(PoolConfig(name="listed", workers=1, idle_timeout_s=120, **LIGHT), TINY)
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump({"task": "upscale", "output": str(tmp_path), "image": "unused.png", "scale": 2})
        + "model: {kind: random, shape: tiny}\npool: {name: spare, workers: 1, gpus_per_worker: 0.5}\n"
    )
    try:
        warm = tessera("pool", "warm", str(job), "pool.cpus_per_worker=0.5", env=at)
        assert warm.returncode == 0, warm.stderr
        assert "pool 'spare': created (1 worker, 0.5 CPU, 0.5 GPU each" in warm.stdout
        assert "pool 'spare' is warm: 1 worker, model loaded" in warm.stdout
        listing = tessera("pool", "list", env=at)
        assert listing.returncode == 0, listing.stderr
        header, *rows = listing.stdout.splitlines()
        assert header.split() == [
            "pool",
            "workers",
            "model",
            "per",
            "worker",
            "jobs",
            "idle",
            "idle",
            "timeout",
        ]
        row = next(r for r in rows if r.startswith("listed ")).split()
        assert row[:7] == ["listed", "1/1", "random/tiny", "0.5", "CPU,", "0.5", "GPU"]
        assert row[7] == "1" and row[-2:] == ["120", "s"]  # one active job; the idle timeout
        refused = tessera("pool", "stop", "listed", env=at)
        assert refused.returncode == 2 and f"pool 'listed' is in use by job(s) {busy.job}" in refused.stderr
        assert "Traceback" not in refused.stderr
        missing = tessera("pool", "stop", "nosuch", env=at)
        assert missing.returncode == 2 and "no pool named 'nosuch'" in missing.stderr
        end_job(busy)
        stopped = tessera("pool", "stop", "--all", env=at)
        assert stopped.returncode == 0, stopped.stderr
        assert "stopped pool 'listed' (1 worker)" in stopped.stdout
        assert "stopped pool 'spare' (1 worker)" in stopped.stdout
        assert not {"listed", "spare"} & set(worker_names())
        assert tessera("pool", "list", env=at).stdout.strip() == "no pools" or "listed" not in listing.stdout
    finally:
        stop_workers("listed")
        stop_workers("spare")


def test_an_idle_pool_releases_itself(ray_cluster):
    """No job calls it (the job that made it counts as ended after the timeout too): it goes."""
    pool = connect_pool(PoolConfig(name="idler", workers=1, idle_timeout_s=8, **LIGHT), TINY)
    assert pool.facts["idle_timeout_s"] == 8
    [state] = [p for p in list_pools() if p.name == "idler"]
    assert state.workers[0].idle_timeout_s == 8  # the timeout is in the pool's state
    deadline = time.monotonic() + 60
    while "idler" in worker_names() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "idler" not in worker_names()


def test_a_reused_pool_with_other_resources_is_recreated_or_refused(ray_cluster):
    first = connect_pool(PoolConfig(name="resized", workers=1, **LIGHT), TINY)
    bigger = PoolConfig(name="resized", workers=1, gpus_per_worker=0.5, cpus_per_worker=1)
    try:
        with pytest.raises(
            PoolError, match=r"reserve 0.5 CPU, 0.5 GPU each, this job asks for 1 CPU, 0.5 GPU"
        ):
            connect_pool(bigger, TINY)  # first's job is active: refused
        end_job(first)
        second = connect_pool(bigger, TINY)
        assert second.facts["action"] == "recreated"
        assert (
            second.facts["reason"]
            == "its workers reserve 0.5 CPU, 0.5 GPU each, this job asks for 1 CPU, 0.5 GPU"
        )
        assert second.infos[0]["pid"] != first.infos[0]["pid"]
        assert second.infos[0]["resources"]["cpus"] == 1
        end_job(second)
        again = connect_pool(bigger, TINY)
        assert again.facts["action"] == "reused" and again.created == 0
        end_job(again)
    finally:
        stop_workers("resized")


@pytest.fixture
def local_ray_env():
    """A temp dir of its own, so `tessera run` starts a local Ray instead of joining the session's."""
    temp = tempfile.mkdtemp(prefix="tsl-", dir="/tmp")
    env = {"RAY_TMPDIR": temp, "RAY_ADDRESS": ""}
    yield env
    shutil.rmtree(temp, ignore_errors=True)


def test_on_a_local_ray_without_gpus(local_ray_env, tmp_path, assets):
    """A small model falls back to CPU workers (recorded); a pool asking for GPUs fails before work."""
    image = tmp_path / "in.png"
    Image.open(assets / "images/eval/set5/bird.png").convert("RGB").crop((0, 0, 64, 48)).save(image)
    job = {
        "task": "upscale",
        "output": str(tmp_path / "cpu"),
        "pool": {"name": "local"},
        "model": {"kind": "random", "shape": "tiny"},
        "image": str(image),
        "scale": 2.0,
        "phases": 1,
        "steps": 2,
        "denoise": [0.5],
        "coherence": {"dilated": 0},
        "tiling": {"method": "multidiffusion", "tile": 64, "overlap": 16},
        "outputs": {"phase_images": False, "latent_stats": False, "compare_bicubic": False},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    proc = tessera("run", str(path), env=local_ray_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pool 'local': created (1 worker, 1 CPU each, model random/tiny)" in proc.stdout
    record = json.loads((tmp_path / "cpu" / "job.json").read_text())
    assert record["pool"]["pool"]["device"] == "cpu" and record["pool"]["pool"]["cpu_fallback"]
    [fallback] = [f for f in record["pool"]["fallbacks"] if f["what"] == "pool on CPU"]
    assert "runs on a CPU and the cluster has no GPU" in fallback["reason"]

    start = time.monotonic()
    proc = tessera(
        "run", str(path), f"output={tmp_path / 'gpu'}", "pool.device=gpu", "pool.workers=2", env=local_ray_env
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        "error: pool 'local': pool.workers=2 x pool.gpus_per_worker=1 needs 2 GPUs; the cluster has 0 GPUs "
        "free (of 0 GPUs)"
    ) in proc.stderr
    assert time.monotonic() - start < 120  # at once, not after pool.placement_timeout_s (600 s)
    record = json.loads((tmp_path / "gpu" / "job.json").read_text())
    assert record["status"] == "failed" and record["error"]["type"] == "PoolError"
