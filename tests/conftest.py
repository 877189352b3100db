"""Test environment: offline, no Ray token auth, no Comet telemetry; one local Ray per session."""

from __future__ import annotations

import os

# Before anything imports ray, diffusers, transformers or comet_ml (platform-notes.md §10).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("COMET_ERROR_TRACKING_ENABLE", "false")
os.environ.setdefault("COMET_DISABLE_AUTO_LOGGING", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.pop("RAY_ADDRESS", None)

import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("TESSERA_ASSETS", REPO.parent / "shared" / "assets"))


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords or "multi_gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def assets() -> Path:
    if not ASSETS.is_dir():
        pytest.skip(f"shared assets not found at {ASSETS} (set TESSERA_ASSETS)")
    return ASSETS


@dataclass(frozen=True)
class RayCluster:
    address: str  # GCS address for ray.init
    dashboard: str  # Jobs API address for `tessera submit`


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory) -> RayCluster:
    """One real Ray for the whole session, started like a user's head node (`ray start --head`),
    with 4 CPUs and 2 fake GPUs so GPU scheduling is testable; the driver joins it."""
    import ray

    ray_bin = Path(sys.executable).parent / "ray"
    port, dash = _free_port(), _free_port()
    # As on a user's head node: the environment's python first on PATH (job entrypoints run `python`).
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled", "PATH": path}
    cmd = [
        str(ray_bin),
        "start",
        "--head",
        f"--port={port}",
        "--num-cpus=4",
        "--num-gpus=2",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        "--disable-usage-stats",
        "--object-store-memory=400000000",
    ]
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    address = f"127.0.0.1:{port}"
    ray.init(address=address, namespace="tessera")
    try:
        yield RayCluster(address, f"http://127.0.0.1:{dash}")
    finally:
        ray.shutdown()
        subprocess.run([str(ray_bin), "stop", "--force"], env=env, capture_output=True)
