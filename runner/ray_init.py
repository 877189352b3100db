"""Starting or joining Ray. The one place that calls `ray.init`.

- With an address (RAY_ADDRESS, or the caller's), the job joins that cluster: `host:port` of a GCS,
  `auto` for the cluster `ray start` recorded on this machine, as Ray reads them.
- Without one, the job starts a private local Ray, even when a `ray start` cluster runs on the
  machine: Ray's own default would join whichever cluster it finds recorded (another user's, a test
  suite's) while the job believed it was alone. To use such a cluster, say so: RAY_ADDRESS=auto.
- The private Ray listens on 127.0.0.1 only. Ray binds its servers to the node's IP address and
  resolves 127.0.0.1 to the machine's outward address unless multi-node clustering is off
  (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read when Ray is imported), so this module sets that
  variable before it imports Ray; its workers inherit it. Ray's token authentication stays on
  (Ray 2.60 turns it on for new local clusters unless RAY_AUTH_MODE says otherwise; tests set
  RAY_AUTH_MODE=disabled). With include_dashboard=False Ray still runs its API server process; it
  serves no dashboard and, like every other process of the private Ray, listens on loopback only.

The job's record says which it was (`RayConnection`), and the console says it in one line.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray keeps its servers on loopback


@dataclass(frozen=True)
class RayConnection:
    """The Ray a job ran on, for job.json.

    address: the cluster's GCS address as the job connected to it.
    started: True when this job started it (a private local Ray that ends with the job).
    requested: what the job was told (RAY_ADDRESS or the caller's address); None = nothing.
    node_ip: the address this driver's node registered with.
    loopback: whether that address is a loopback one (a started Ray then listens nowhere else).
    auth: Ray's authentication mode in this process ("token" or "disabled").
    """

    address: str
    started: bool
    requested: str | None
    node_ip: str
    loopback: bool
    auth: str

    def describe(self) -> str:
        auth = "token authentication" if self.auth == "token" else f"authentication {self.auth}"
        if self.started:
            where = "loopback only" if self.loopback else f"listening on {self.node_ip}"
            return f"ray: started a private local Ray at {self.address} ({where}, {auth}), for this run only"
        told = f" (RAY_ADDRESS={self.requested})" if self.requested else ""
        return f"ray: joined the cluster at {self.address}{told}, {auth}"


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return ip == "localhost"


def _connection(*, started: bool, requested: str | None) -> RayConnection:
    import ray

    node_ip = ray.util.get_node_ip_address()
    return RayConnection(
        address=ray.get_runtime_context().gcs_address,
        started=started,
        requested=requested,
        node_ip=node_ip,
        loopback=_is_loopback(node_ip),
        auth=os.environ.get("RAY_AUTH_MODE", "disabled"),  # Ray sets "token" when it turns it on
    )


def init_ray(
    *, address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None
) -> RayConnection:
    """Join `address` (default RAY_ADDRESS) or start a private local Ray on loopback."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if "ray" not in sys.modules and not address:
        os.environ.setdefault(SINGLE_NODE_ENV, "0")  # before Ray reads it at import
    import ray

    if ray.is_initialized():
        return _connection(started=False, requested="this process was already connected")
    if address:
        ray.init(address=address, namespace="tessera", log_to_driver=True)
        return _connection(started=False, requested=address)
    # Workers of a local Ray import the package from the repository even without an install.
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))}
    ray.init(
        address="local",  # a new Ray, never one found recorded on the machine
        namespace="tessera",
        include_dashboard=False,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        runtime_env={"env_vars": env},
        log_to_driver=True,
    )
    return _connection(started=True, requested=None)
