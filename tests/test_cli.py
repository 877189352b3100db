"""`tessera run` and `tessera submit|status|logs|stop` as a user runs them, against the session's
real `ray start --head` cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from PIL import Image

pytestmark = pytest.mark.cpu
REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "clusters/examples/tiny_tiled_img2img.yaml"


def tessera(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "runner", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=REPO,
    )


def kill_pool(name: str, size: int) -> None:
    for i in range(size):
        try:
            ray.kill(ray.get_actor(f"{name}-{i}", namespace="tessera"))
        except ValueError:
            pass


@pytest.fixture(scope="module")
def small_image(tmp_path_factory, assets) -> Path:
    path = tmp_path_factory.mktemp("cli") / "bird.png"
    Image.open(assets / "images/eval/set5/bird.png").convert("RGB").crop((64, 64, 160, 128)).save(path)
    return path


def test_run_writes_the_artifacts(ray_cluster, small_image, tmp_path):
    out = tmp_path / "run"
    proc = tessera(
        "run",
        str(EXAMPLE),
        f"image={small_image}",
        f"output={out}",
        "pool.name=cli",
        "tiling.tile=64",
        "tiling.overlap=16",
        env={"RAY_ADDRESS": ray_cluster.address},
    )
    kill_pool("cli", 1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in (
        "result.png",
        "bicubic.png",
        "comparison.png",
        "job.json",
        "metrics.jsonl",
        "phase1/result.png",
    ):
        assert (out / name).is_file(), name
    record = json.loads((out / "job.json").read_text())
    assert record["status"] == "succeeded"
    assert record["config"]["steps"] == 8 and record["seed"] == 0
    assert record["versions"]["torch"].startswith("2.")
    timings = record["timings"]
    assert timings["total_s"] > 0 and timings["in_model_s"] > 0 and "dispatch_overhead_s" in timings
    assert record["pool"]["workers"][0]["gpu_ids"]  # a fake GPU was reserved for the worker
    # 16 x 24 latent, 8-pixel tiles with overlap 2 (stride 6): 3 rows x 4 columns, 4 steps at denoise 0.5
    assert record["records"]["views_per_step"]["phase1"] == [12] * 4
    assert record["pool"]["evaluate_call_s_by_views"]["12"]["n"] == 4  # one evaluate call per step
    assert record["driver_threads"]["torch_threads"] <= 8 and "applied" in record["driver_malloc"]
    assert "[phase1] 4/4" in proc.stdout
    assert Image.open(out / "result.png").size == (192, 128)


def test_run_reports_bad_input_without_a_traceback(tmp_path):
    proc = tessera("run", str(EXAMPLE), "stepz=3", f"output={tmp_path}")
    assert proc.returncode == 2
    assert "unknown key stepz" in proc.stderr and "Traceback" not in proc.stderr
    proc = tessera("run", str(EXAMPLE), f"image={tmp_path / 'none.png'}", f"output={tmp_path}")
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_submit_status_logs_stop(ray_cluster, small_image, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "job.yaml").write_text(EXAMPLE.read_text())
    (work / "bird.png").write_bytes(small_image.read_bytes())
    out = tmp_path / "submitted"
    proc = tessera(
        "submit",
        str(work / "job.yaml"),
        "image=bird.png",
        f"output={out}",
        "pool.name=submitted",
        "tiling.tile=64",
        "--address",
        ray_cluster.dashboard,
        "--working-dir",
        str(work),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sid = proc.stdout.strip().splitlines()[-1]
    assert sid.startswith("tessera-")
    deadline, status = time.time() + 240, ""
    while time.time() < deadline:
        status = tessera("status", sid, "--address", ray_cluster.dashboard).stdout.strip()
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(2)
    logs = tessera("logs", sid, "--address", ray_cluster.dashboard).stdout
    kill_pool("submitted", 1)
    assert status == "SUCCEEDED", logs[-3000:]
    assert "[phase1] 4/4" in logs
    assert (out / "result.png").is_file()
    # stop: a finished job is no longer running
    assert tessera("stop", sid, "--address", ray_cluster.dashboard).stdout.strip() == "not running"


def test_submit_validates_before_uploading(ray_cluster, tmp_path):
    proc = tessera("submit", str(EXAMPLE), "steps=-1", "--address", ray_cluster.dashboard)
    assert proc.returncode == 2 and "steps must be >= 1, got -1" in proc.stderr
