"""A node lost mid-phase on a multi-node `ray.cluster_utils.Cluster` (head without GPUs, one GPU
node per worker, fake GPUs): the job waits for its worker's replacement, which starts when a new node
joins, and the image equals the undisturbed run's bit for bit; with no node joining, the job fails
after pool.placement_timeout_s with a message naming the worker and the timeout.

The worker blocks in a deterministic velocity call (after writing its node id to a marker file) so
the test removes its node while the job is mid-phase. The module runs its own cluster and restores
the session's Ray connection afterwards.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import ray
import torch
import yaml
from PIL import Image

from runner.config import load_job
from runner.context import JobArtifacts, JobContext, LocalModelPool
from runner.models import load_model
from runner.pool.job_workers import WorkerLostError
from runner.pool.lifecycle import stop_workers
from runner.pool.pool import connect_pool
from runner.pool.worker import ModelWorker
from runner.run import run_job
from tasks.upscale import run

pytestmark = pytest.mark.cpu
REPO = Path(__file__).resolve().parents[1]
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # BlockOnce travels by value


class BlockOnce(ModelWorker):
    """In its AT-th velocity call the worker writes its node id to MARKER and never returns (its
    node is about to be removed); once per marker file."""

    AT = 4
    MARKER = ""

    def velocity(self, job, x, sigma, rope, *ids):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == self.AT and not os.path.exists(self.MARKER):
            Path(self.MARKER).write_text(ray.get_runtime_context().get_node_id())
            time.sleep(3600)
        return super().velocity(job, x, sigma, rope, *ids)


@pytest.fixture(scope="module")
def cluster(ray_cluster):
    from ray.cluster_utils import Cluster

    temp = tempfile.mkdtemp(prefix="tsc-", dir="/tmp")
    (Path(temp) / "ray").mkdir()
    session_tmp = os.environ["RAY_TMPDIR"]
    os.environ["RAY_TMPDIR"] = temp  # the cluster records its address here, not in the session's
    ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args=dict(num_cpus=2, num_gpus=0, temp_dir=temp))
    try:
        ray.init(address=c.address, namespace="tessera", runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
        c.temp = temp
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        os.environ["RAY_TMPDIR"] = session_tmp
        shutil.rmtree(temp, ignore_errors=True)
        ray.init(address=ray_cluster.address, namespace="tessera")


@pytest.fixture(scope="module")
def job_file(tmp_path_factory, assets) -> Path:
    root = tmp_path_factory.mktemp("cluster")
    crop = root / "crop.png"
    Image.open(assets / "images/eval/set5/bird.png").convert("RGB").crop((100, 100, 180, 164)).save(crop)
    spec = {
        "task": "upscale",
        "output": str(root / "out"),
        "pool": {
            "name": "nodes",
            "workers": 1,
            "gpus_per_worker": 1,
            "max_batch": 4,
            "placement_timeout_s": 300,
        },
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
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def undisturbed(job_file: Path, out: Path) -> torch.Tensor:
    cfg = load_job(job_file).config
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ctx = JobContext(
            JobArtifacts(out, stream=open(os.devnull, "w")), LocalModelPool(load_model(cfg.model))
        )
        return run(cfg, ctx).image
    finally:
        torch.set_num_threads(threads)


def gpu_node(cluster):
    return cluster.add_node(num_cpus=1, num_gpus=1, temp_dir=cluster.temp)


def run_and_remove_the_workers_node(
    cluster, job_file: Path, marker: Path, overrides: list[str], *, then=None
):
    """Run the job in a thread on a pool of BlockOnce workers; when the worker blocks, remove its
    node and call `then()`. Returns (outcome or None, error or None)."""
    job = load_job(job_file, overrides)
    worker_cls = type("Block", (BlockOnce,), {"MARKER": str(marker)})
    # The pool starts with the job file's timeout (a worker process takes seconds to start on a busy
    # CI machine); the job that reuses it then waits for a lost worker's replacement for the
    # overrides' pool.placement_timeout_s.
    start = replace(job.runner.pool, placement_timeout_s=load_job(job_file).runner.pool.placement_timeout_s)
    pool = connect_pool(start, job.config.model, worker_cls=worker_cls)
    ray.get([w.end_job.remote(pool.job) for w in pool.workers])
    result: dict = {}

    def drive() -> None:
        try:
            result["outcome"] = run_job(job_file, overrides, stream=open(os.devnull, "w"))[0]
        except BaseException as err:  # handed to the test thread, which asserts on it
            result["error"] = err

    thread = threading.Thread(target=drive)
    thread.start()
    deadline = time.monotonic() + 600
    while not marker.exists() and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.exists(), result
    node_id = marker.read_text()
    [node] = [n for n in cluster.list_all_nodes() if n.node_id == node_id]
    cluster.remove_node(node)
    if then is not None:
        then()
    thread.join(timeout=900)
    assert not thread.is_alive()
    stop_workers(job.runner.pool.name)
    return result.get("outcome"), result.get("error"), node_id


def test_node_lost_mid_phase_the_job_waits_for_a_new_node_and_the_image_is_exact(cluster, job_file, tmp_path):
    gpu_node(cluster)
    outcome, error, lost_node = run_and_remove_the_workers_node(
        cluster,
        job_file,
        tmp_path / "blocked",
        [f"output={tmp_path / 'out'}"],
        then=lambda: gpu_node(cluster),
    )
    assert error is None, error
    record = outcome.record
    assert record["status"] == "succeeded"
    assert torch.equal(outcome.result.image, undisturbed(job_file, tmp_path / "local"))
    fallbacks = record["pool"]["fallbacks"]
    assert {"worker lost", "worker replaced"} <= {f["what"] for f in fallbacks}
    assert "batch requeued" in {f["what"] for f in record["fallbacks"]}
    assert record["pool"]["workers"][0]["node_id"] != lost_node  # the replacement runs on the new node


def test_node_lost_and_no_replacement_fails_naming_the_worker_and_the_timeout(cluster, job_file, tmp_path):
    outcome, error, _ = run_and_remove_the_workers_node(
        cluster,
        job_file,
        tmp_path / "blocked",
        [f"output={tmp_path / 'out'}", "pool.name=stranded", "pool.placement_timeout_s=5"],
    )
    assert outcome is None and isinstance(error, WorkerLostError)
    message = str(error)
    assert message.startswith("lost worker 0 (stranded-0, pid ")
    assert "no replacement started within pool.placement_timeout_s=5 s" in message
    assert "waiting for a replacement of worker 0 to start (1 CPU, 1 GPU each); the cluster has " in message
    import json

    record = json.loads((tmp_path / "out" / "job.json").read_text())
    assert record["status"] == "failed" and record["error"]["type"] == "WorkerLostError"
