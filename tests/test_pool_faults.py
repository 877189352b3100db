"""Lost workers on a real local Ray: a worker SIGKILLed mid-step or mid-VAE-round is replaced, gets
the job's model and conditioning before any work, and the job's image equals an undisturbed run's
bit for bit; job.json records the loss, the requeue and the replacement. A poison input (one that
kills every process it reaches) stops the job after its second victim instead of burning the pool.

The faults are injected by test-only ModelWorker subclasses that SIGKILL their own process at a
deterministic call; the job's pool is created with them first, and the job reuses it by name (its
replacements are plain ModelWorkers). The undisturbed run is the same job in process at one torch
thread, which equals the pool bit for bit (tests/test_pool_equivalence.py).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import ray
import torch
import yaml
from PIL import Image

from core.models.loading import ModelSpec
from core.tiling.views import ViewInput
from runner.config import PoolConfig, load_job
from runner.context import JobArtifacts, JobContext, LocalModelPool
from runner.models import load_model
from runner.pool.lifecycle import stop_workers
from runner.pool.pool import connect_pool
from runner.pool.ray_pool import RayModelPool
from runner.pool.worker import ModelWorker
from runner.run import run_job
from tasks.upscale import run

pytestmark = pytest.mark.cpu
TINY = ModelSpec(kind="random", shape="tiny")
# The fault-injecting workers below are defined here, and this module is not importable on Ray's
# workers: ship their classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class SelfKilling(ModelWorker):
    """Worker KILL_INDEX SIGKILLs its own process in its AT-th call of METHOD, once (MARKER file)."""

    KILL_INDEX = 0
    METHOD = "velocity"
    AT = 3
    MARKER = ""

    def _count(self, method: str) -> None:
        self.calls = getattr(self, "calls", {})
        self.calls[method] = self.calls.get(method, 0) + 1
        if (
            method == self.METHOD
            and self.index == self.KILL_INDEX
            and self.calls[method] == self.AT
            and not os.path.exists(self.MARKER)
        ):
            Path(self.MARKER).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)

    def velocity(self, job, x, sigma, rope, *ids):
        self._count("velocity")
        return super().velocity(job, x, sigma, rope, *ids)

    def vae_advance(self, job, pass_id, reply):
        self._count("vae_advance")
        return super().vae_advance(job, pass_id, reply)


def killer(index: int, method: str, at: int, marker: Path) -> type:
    return type(
        "Killer", (SelfKilling,), {"KILL_INDEX": index, "METHOD": method, "AT": at, "MARKER": str(marker)}
    )


class Poisoned(ModelWorker):
    """Dies on any batch holding a view at sigma POISON: the input, not the worker, is at fault."""

    POISON = 0.123

    def velocity(self, job, x, sigma, rope, *ids):
        if (sigma.array == self.POISON).any():
            os.kill(os.getpid(), signal.SIGKILL)
        return super().velocity(job, x, sigma, rope, *ids)


@pytest.fixture(scope="module")
def job_files(tmp_path_factory, assets):
    """job(name, workers) -> a job file of the tiny two-phase upscale with tiled VAE on pool `name`."""
    root = tmp_path_factory.mktemp("faults")
    crop = root / "crop.png"
    Image.open(assets / "images/eval/set5/bird.png").convert("RGB").crop((100, 100, 180, 164)).save(crop)

    def job(name: str, workers: int) -> Path:
        spec = {
            "task": "upscale",
            "output": str(root / name),
            "pool": {"name": name, "workers": workers, "gpus_per_worker": 0.5, "max_batch": 4},
            "model": {"kind": "random", "shape": "tiny"},
            "image": str(crop),
            "scale": 2.0,
            "phases": 2,
            "steps": 3,
            "denoise": [0.6, 0.4],
            "coherence": {"dilated": 2},
            "tiling": {"method": "multidiffusion", "tile": 64, "overlap": 16},
            "vae_tile": 64,
            "outputs": {"phase_images": False, "latent_stats": False, "compare_bicubic": False},
        }
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec))
        return path

    return job


@pytest.fixture(scope="module")
def undisturbed(job_files, tmp_path_factory):
    """The job's image in process at one torch thread (what every pool run must equal)."""
    cfg = load_job(job_files("reference", 1)).config
    local = LocalModelPool(load_model(cfg.model, "cpu"), max_batch=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("undisturbed")
        return run(cfg, JobContext(JobArtifacts(out, stream=open(os.devnull, "w")), local)).image
    finally:
        torch.set_num_threads(threads)


def run_on_faulty_pool(job_file: Path, worker_cls: type) -> dict:
    """Create the job's pool with `worker_cls`, run the job on it (reused by name), stop the pool."""
    job = load_job(job_file)
    pool = connect_pool(job.runner.pool, job.config.model, worker_cls=worker_cls)
    ray.get([w.end_job.remote(pool.job) for w in pool.workers])
    try:
        [outcome] = run_job(job_file, stream=open(os.devnull, "w"))
    finally:
        stop_workers(job.runner.pool.name)
    return outcome


def whats(entries: list[dict]) -> list[str]:
    return [e["what"] for e in entries]


@pytest.mark.parametrize("workers", [1, 2])
def test_worker_killed_mid_step_is_replaced_and_the_image_is_exact(
    ray_cluster, job_files, undisturbed, tmp_path, workers
):
    victim = workers - 1
    outcome = run_on_faulty_pool(
        job_files(f"kill-step-{workers}", workers), killer(victim, "velocity", 3, tmp_path / "killed")
    )
    assert (tmp_path / "killed").is_file()  # the fault happened
    record = outcome.record
    assert record["status"] == "succeeded"
    assert torch.equal(outcome.result.image, undisturbed)
    pool_fallbacks = record["pool"]["fallbacks"]
    assert "worker lost" in whats(pool_fallbacks)
    assert "batch requeued" in whats(record["fallbacks"])  # job.json's own list, as run.py writes it
    lost = next(e for e in pool_fallbacks if e["what"] == "worker lost")
    assert lost["worker"] == victim and "ActorDiedError" in lost["lost"]
    if workers == 1:  # the job could only finish on the replacement
        replaced = next(e for e in pool_fallbacks if e["what"] == "worker replaced")
        assert replaced["worker"] == 0 and replaced["replacement"] != lost["lost"]
        assert record["pool"]["workers"][0]["pid"] != int((tmp_path / "killed").read_text())


def test_worker_killed_mid_vae_round_restarts_the_pass_exactly(ray_cluster, job_files, undisturbed, tmp_path):
    outcome = run_on_faulty_pool(job_files("kill-vae", 2), killer(1, "vae_advance", 2, tmp_path / "killed"))
    assert (tmp_path / "killed").is_file()
    record = outcome.record
    assert record["status"] == "succeeded"
    assert torch.equal(outcome.result.image, undisturbed)
    assert {"worker lost", "tiled VAE pass restarted"} <= set(whats(record["pool"]["fallbacks"]))


def test_a_poison_input_stops_the_job_after_its_second_victim(ray_cluster):
    cfg = PoolConfig(name="poison", workers=2, gpus_per_worker=0.5, max_batch=1)
    pool = connect_pool(cfg, TINY, worker_cls=Poisoned)
    rp = RayModelPool(pool, cfg)
    g = torch.Generator().manual_seed(0)
    views = [ViewInput(torch.randn(32, 8, 8, generator=g), s) for s in (0.9, Poisoned.POISON, 0.7)]
    try:
        with pytest.raises(RuntimeError, match="batch 1 lost its worker twice; giving up"):
            rp.evaluate(views)
        lost = [e for e in rp.workers.fallbacks if e["what"] == "worker lost"]
        assert len(lost) == 2  # the two processes it reached, no more
        assert rp.evaluate(views[:1])[0].shape == (32, 8, 8)  # the pool still works (replacements)
    finally:
        rp.close()
        stop_workers("poison")
