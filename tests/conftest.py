"""Test environment: offline, no Ray token auth, no Comet telemetry; one local Ray per session."""

from __future__ import annotations

import os

# Before anything imports ray, diffusers, transformers or comet_ml (docs/runner.md, Tests).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("COMET_ERROR_TRACKING_ENABLE", "false")
os.environ.setdefault("COMET_DISABLE_AUTO_LOGGING", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.pop("RAY_ADDRESS", None)

import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
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
    with 4 CPUs and 2 fake GPUs so GPU scheduling is testable; the driver joins it.

    The head runs in its own process group with its own temp dir (also exported as RAY_TMPDIR, so a
    `tessera run` inside a test never finds another cluster), and teardown signals that group only:
    other users' and other test sessions' Ray processes on the host are never touched.
    """
    import ray

    ray_bin = Path(sys.executable).parent / "ray"
    port, dash = _free_port(), _free_port()
    # Every port the head listens on is chosen here: Ray's fixed defaults (e.g. the dashboard
    # agent's 52365) collide with any other Ray on a shared host.
    agent_ports = {
        "--dashboard-agent-listen-port": _free_port(),
        "--dashboard-agent-grpc-port": _free_port(),
        "--metrics-export-port": _free_port(),
        "--runtime-env-agent-port": _free_port(),
        "--ray-client-server-port": _free_port(),
    }
    # Ray's socket paths live under the temp dir and must stay short (AF_UNIX: 107 bytes).
    temp_dir = tempfile.mkdtemp(prefix="tsr-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = temp_dir
    # As on a user's head node: the environment's python first on PATH (job entrypoints run `python`).
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled", "PATH": path}
    # On SIGTERM `ray start --block` first drains its node, waiting up to this many seconds (30 by
    # default) for the raylet to exit; nothing of this head serves traffic, so teardown skips the wait
    # (measured: the session's teardown took 60 s with the drain, 5 s without).
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    cmd = [
        str(ray_bin),
        "start",
        "--head",
        "--block",
        f"--temp-dir={temp_dir}",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--num-cpus=4",
        "--num-gpus=2",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        "--disable-usage-stats",
        "--object-store-memory=400000000",
        *(f"{flag}={value}" for flag, value in agent_ports.items()),
    ]
    log = open(Path(temp_dir) / "ray_start.log", "w")  # noqa: SIM115 (closed at teardown)
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        _wait_for_head(head, address, dash, Path(temp_dir) / "ray_start.log")
        ray.init(address=address, namespace="tessera")
        yield RayCluster(address, f"http://127.0.0.1:{dash}")
    finally:
        ray.shutdown()
        _end_process_group(head)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_head(head: subprocess.Popen, address: str, dash: int, log: Path, timeout: float = 120) -> None:
    """Until the head's GCS and dashboard accept connections (or `ray start` exits, or time runs out)."""
    host, port = address.split(":")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}:\n{log.read_text()[-4000:]}")
        if all(_accepts(host, p) for p in (int(port), dash)):
            return
        time.sleep(0.5)
    raise RuntimeError(f"the test's Ray head did not come up in {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def _accepts(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _end_process_group(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM the head's process group (ray start --block ends its raylet, GCS and workers), then
    SIGKILL whatever of that group is left after `grace` seconds."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
