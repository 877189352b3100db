"""Starting or joining Ray. The one place that calls `ray.init`.

With RAY_ADDRESS set (a cluster, or the address a Ray job's driver gets) we join it; otherwise we
start a local Ray on this machine. RAY_AUTH_MODE / RAY_AUTH_TOKEN pass through unchanged (Ray 2.60
enables token auth for local clusters; tests and CI set RAY_AUTH_MODE=disabled).
"""

from __future__ import annotations

import os
from pathlib import Path

import ray

REPO_ROOT = Path(__file__).resolve().parents[1]


def init_ray(*, num_cpus: int | None = None, num_gpus: int | None = None) -> dict:
    """Join RAY_ADDRESS or start a local Ray; returns how (for job.json)."""
    if ray.is_initialized():
        return {"address": "already initialised", "local": False}
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace="tessera", log_to_driver=True)
        return {"address": address, "local": False}
    # Workers of a local Ray import the package from the repository even without an install.
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))}
    ray.init(
        namespace="tessera",
        include_dashboard=False,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        runtime_env={"env_vars": env},
        log_to_driver=True,
    )
    return {"address": "local", "local": True}
