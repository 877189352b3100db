"""Submitting jobs to a running cluster through the Ray Jobs API, and following them.

`submit` validates the job here, checks its inputs here (the task's pre-flight check, for every job
of a sweep), builds the package the job needs (runner/package.py: code, the built-in weights it
uses, its inputs, the resolved job file) and submits `python -m runner run JOB.yaml` with it: the
same command a user runs locally, so a job behaves the same under `tessera run`, `tessera submit`
and a KubeRay RayJob. The entrypoint reserves no GPU: the pool's workers do.

Results go to the job's `output`, which for a submitted job must be reachable after the job's
working dir is gone: a storage URI (runner/storage.py), `--storage URI` under which a relative
output is placed, or an absolute path on a volume the cluster's nodes share. The submission's
metadata records it, so `fetch` finds it from the submission id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from runner.config import Job, JobConfigError, load_job
from runner.storage import Location, check_reachable, is_uri, parse_location, pull
from runner.sweep import expand, override

PASSTHROUGH_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "COMET_ERROR_TRACKING_ENABLE")
ENTRYPOINT_CPUS = 0.5
RAY_PACKAGING_LOGGER = "ray._private.runtime_env.packaging"  # zips and uploads working dirs


class JobsError(RuntimeError):
    """A Jobs API call that failed for a reason the user can act on; the message is one line."""


@dataclass(frozen=True)
class Submission:
    submission_id: str
    output: str  # where the results go: a storage URI or a path on the cluster's shared volume
    package_mib: float
    inputs: dict
    weights: list[str]


@dataclass(frozen=True)
class JobRow:
    submission_id: str
    status: str
    started: str
    task: str
    output: str


def submitted_output(job: Job, storage: str | None) -> str:
    """Where a submitted job's results go; JobConfigError when they would be lost with the job."""
    output = job.runner.output
    if storage:
        if is_uri(output) or Path(output).is_absolute():
            raise JobConfigError(f"--storage places a relative output under it; output is {output!r}")
        return parse_location(storage).join(output).uri if is_uri(storage) else str(Path(storage) / output)
    if is_uri(output) or Path(output).is_absolute():
        return output
    raise JobConfigError(
        f"output {output!r} is relative: on the cluster it would land in the job's temporary working "
        "dir and be lost with it. Pass --storage URI (e.g. s3://BUCKET/tessera, file:///mnt/shared) or "
        "output=URI, or an absolute path on a volume every node mounts"
    )


def preflight(path: str | Path, overrides: list[str], job: Job) -> int:
    """The task's pre-flight check here, for the job and every job of its sweep; returns how many."""
    from runner.run import check_job

    combos = expand(job.runner.sweep, Path(path).resolve().parent) if job.runner.sweep else [{}]
    for coords in combos:
        sub = load_job(path, [*overrides, *(override(k, v) for k, v in coords.items())]) if coords else job
        check_job(sub)
    return len(combos)


def submit(
    job_file: str,
    overrides: list[str],
    *,
    address: str,
    submission_id: str | None = None,
    storage: str | None = None,
    inputs_on_cluster: bool = False,
) -> Submission:
    """Validate and check the job here, then package and submit it; returns the submission."""
    from runner.package import build_package

    job = load_job(job_file, overrides)
    output = submitted_output(job, storage)
    if not inputs_on_cluster:
        preflight(job_file, overrides, job)
    if is_uri(output):
        check_reachable(parse_location(output))
    sid = submission_id or f"tessera-{uuid.uuid4().hex[:10]}"
    env = {k: os.environ[k] for k in PASSTHROUGH_ENV if k in os.environ}
    with tempfile.TemporaryDirectory(prefix="tessera-submit-") as tmp:
        pkg = build_package(
            job,
            Path(tmp),
            job_name=Path(job_file).name,
            output=output,
            base=Path(job_file).resolve().parent,
            inputs_on_cluster=inputs_on_cluster,
        )
        entry = " ".join(shlex.quote(a) for a in ["python", "-m", "runner", "run", pkg.job_file])
        with _quiet_about_weights(Path(tmp)):
            _call(
                lambda c: c.submit_job(
                    entrypoint=entry,
                    submission_id=sid,
                    runtime_env={"working_dir": tmp, "env_vars": env},
                    entrypoint_num_cpus=ENTRYPOINT_CPUS,
                    metadata={
                        "tessera_job": Path(job_file).name,
                        "tessera_task": job.task.name,
                        "tessera_output": output,
                    },
                ),
                address,
            )
        size = pkg.size()
    return Submission(sid, output, round(size / 2**20, 2), pkg.inputs, pkg.weights)


class _BuiltInWeightsFilter(logging.Filter):
    """Drops Ray's "File ... is very large" warning for the built-in weights of a package: they are
    shipped on purpose (the reference model's shards are 11 MiB each, over Ray's 10 MiB warning
    size), and submit reports the package's size and weights itself. Inputs still warn."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.prefix = f"File {folder / 'models'}/"

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith(self.prefix) and "is very large" in message)


@contextlib.contextmanager
def _quiet_about_weights(folder: Path):
    log = logging.getLogger(RAY_PACKAGING_LOGGER)
    quiet = _BuiltInWeightsFilter(folder)
    log.addFilter(quiet)
    try:
        yield
    finally:
        log.removeFilter(quiet)


def client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except ConnectionError as err:
        raise JobsError(f"cannot reach the Ray Jobs API at {address}: {err}") from None


def _call(fn, address: str, submission_id: str | None = None):
    """fn(client), with the Jobs API's errors for an unknown id or a refused request as one line."""
    c = client(address)
    try:
        return fn(c)
    except RuntimeError as err:
        text = str(err)
        if submission_id and "404" in text:
            raise JobsError(f"no job {submission_id!r} on {address}") from None
        raise JobsError(
            f"the Ray Jobs API at {address} refused the request: {text.splitlines()[0]}"
        ) from None


def status(submission_id: str, *, address: str) -> str:
    return str(_call(lambda c: c.get_job_status(submission_id), address, submission_id).value)


def logs(submission_id: str, *, address: str) -> str:
    return _call(lambda c: c.get_job_logs(submission_id), address, submission_id)


def follow_logs(submission_id: str, *, address: str, stream=None) -> str:
    """Print a job's logs as they come until it ends; returns its final status."""
    stream = stream or sys.stdout
    c = client(address)
    _call(lambda _: c.get_job_info(submission_id), address, submission_id)  # an unknown id fails here

    async def tail() -> None:
        async for chunk in c.tail_job_logs(submission_id):
            stream.write(chunk)
            stream.flush()

    asyncio.run(tail())
    return status(submission_id, address=address)


def stop(submission_id: str, *, address: str) -> bool:
    return _call(lambda c: c.stop_job(submission_id), address, submission_id)


def list_jobs(*, address: str, all_jobs: bool = False) -> list[JobRow]:
    """Submitted jobs, oldest first: Tessera's, or every job of the cluster with all_jobs."""
    rows = []
    for info in _call(lambda c: c.list_jobs(), address):
        meta = info.metadata or {}
        if not all_jobs and "tessera_task" not in meta:
            continue
        started = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.start_time / 1000))
            if info.start_time
            else "-"
        )
        rows.append(
            JobRow(
                info.submission_id or info.job_id or "-",
                str(info.status.value),
                started,
                meta.get("tessera_task", "-"),
                meta.get("tessera_output", "-"),
            )
        )
    return sorted(rows, key=lambda r: r.started)


def fetch(submission_id: str, dest: str | None, *, address: str) -> tuple[Location, Path, list[str], str]:
    """Copy a submitted job's results to dest (default: ./<its output's last name>); returns the
    location, the destination, the files copied and the job's status."""
    info = _call(lambda c: c.get_job_info(submission_id), address, submission_id)
    output = (info.metadata or {}).get("tessera_output")
    if not output:
        raise JobsError(f"job {submission_id!r} was not submitted by tessera submit (no output recorded)")
    loc = parse_location(output)
    if not is_uri(output) and not Path(output).exists():
        raise JobsError(
            f"job {submission_id!r} wrote to {output}, a path on the cluster's nodes that this machine "
            "does not have: mount that volume here, or submit with a storage URI"
        )
    target = Path(dest) if dest else Path.cwd() / loc.name
    files = pull(loc, target)
    return loc, target, files, str(info.status.value)
