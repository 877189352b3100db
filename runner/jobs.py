"""Submitting jobs to a running cluster through the Ray Jobs API, and following them.

The entrypoint is the same command a user runs locally (`python -m runner run JOB.yaml k=v`), so a
job behaves the same under `tessera run`, `tessera submit` and a KubeRay RayJob. The entrypoint
reserves no GPU: the pool's workers do.
"""

from __future__ import annotations

import os
import shlex
import uuid
from pathlib import Path

from runner.config import load_job

PASSTHROUGH_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "COMET_ERROR_TRACKING_ENABLE")
EXCLUDES = [".git", ".venv", "runs", "bench/results", "**/__pycache__", ".pytest_cache", ".ruff_cache"]


def _address(address: str | None) -> str:
    address = address or os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not address:
        raise ValueError("no cluster address: pass --address http://HOST:8265 or set RAY_ADDRESS")
    return address


def client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(_address(address))


def submit(
    job_file: str,
    overrides: list[str],
    *,
    address: str | None,
    working_dir: str = ".",
    submission_id: str | None = None,
) -> str:
    """Validate the job here (so a bad file fails before upload), then submit it; returns the id."""
    load_job(job_file, overrides)
    working = Path(working_dir).resolve()
    try:
        rel = Path(job_file).resolve().relative_to(working)
    except ValueError:
        raise ValueError(
            f"job file {job_file!r} must lie inside the working directory {str(working)!r}"
        ) from None
    entry = " ".join(shlex.quote(a) for a in ["python", "-m", "runner", "run", str(rel), *overrides])
    env = {k: os.environ[k] for k in PASSTHROUGH_ENV if k in os.environ}
    sid = submission_id or f"tessera-{uuid.uuid4().hex[:10]}"
    return client(address).submit_job(
        entrypoint=entry,
        submission_id=sid,
        runtime_env={"working_dir": str(working), "excludes": EXCLUDES, "env_vars": env},
        entrypoint_num_cpus=0.5,
        metadata={"tessera_job": str(rel)},
    )


def status(submission_id: str, *, address: str | None) -> str:
    return str(client(address).get_job_status(submission_id).value)


def logs(submission_id: str, *, address: str | None) -> str:
    return client(address).get_job_logs(submission_id)


def stop(submission_id: str, *, address: str | None) -> bool:
    return client(address).stop_job(submission_id)
