"""Running one job: validate, start or join Ray, bring up the pool, run the task, write job.json.

job.json holds the resolved config, package versions, the seed, the job's fingerprint, timings
(total, in-model, dispatch overhead), views per step, the workers used and every fallback that
ran. It is written when the job starts (status "running"), after each checkpoint, and when the job
ends, failed and interrupted jobs included, so nothing already measured is lost: a failed job keeps
its pool summary, fallbacks, timings and the last progress line reached (docs/reliability.md).

Before any work: the task's own check, a full decode of every input image, the job's size against
the pixel budget (runner/estimate.py), and the output folder (runner/output_folder.py: a folder
holding a job of other settings is refused unless --overwrite). A sweep checks every job first,
then runs them in order, goes on past a failed one and writes sweep.json after each.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from runner.artifacts import write_json
from runner.config import Job, JobConfigError, load_job
from runner.context import JobArtifacts, JobContext
from runner.device_task import summarize
from runner.driver_process import keep_freed_memory, limit_driver_threads
from runner.estimate import Estimate
from runner.fingerprint import device_kinds, job_fingerprint, numbers_config
from runner.output_folder import Attempt, check_output, open_output
from runner.preflight import check_budget, check_inputs, estimate_job
from runner.ray_init import init_ray
from runner.summary import finish
from runner.sweep import expand, folder_name, override
from runner.tracking import Tracker, check_tracking

PACKAGES = (
    "tessera",
    "torch",
    "ray",
    "diffusers",
    "transformers",
    "safetensors",
    "pyarrow",
    "omegaconf",
    "numpy",
)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def check_job(job: Job) -> None:
    """Checks that need the filesystem, before any work starts: the task's (inputs exist, sizes fit),
    then every input image decoded in full."""
    check = job.task.check_fn()
    if check is not None:
        try:
            check(job.config)
        except (ValueError, FileNotFoundError) as err:
            raise JobConfigError(str(err)) from None
    check_inputs(job)


def _settings(job: Job):
    return lambda config: numbers_config(job.task.unnumbered(), config)


@dataclass(frozen=True)
class Prepared:
    """A job that passed its pre-flight checks."""

    job: Job
    estimate: Estimate | None
    coords: dict[str, Any] | None = None


def preflight(job: Job, *, overwrite: bool, allow_large: bool, coords: dict | None = None) -> Prepared:
    """Every check that can fail before work starts; nothing is written."""
    check_job(job)
    estimate = estimate_job(job)
    check_budget(estimate, allow_large=allow_large)
    check_output(Path(job.runner.output), _settings(job)(job.resolved), _settings(job), overwrite=overwrite)
    return Prepared(job, estimate, coords)


@dataclass
class JobOutcome:
    output: Path
    record: dict[str, Any]
    result: Any


class JobInterrupted(KeyboardInterrupt):
    """Ctrl-C during a job, after its record was written; says where it stopped."""


def run_job(
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    stream=None,
    overwrite: bool = False,
    allow_large: bool = False,
) -> list[JobOutcome]:
    """Run a job file (every job of its sweep, in order, on one shared pool); returns the outcomes.

    A sweep behaves like a set of Tune trials: every combination is validated and checked before any
    work starts; then each job is announced (index and coordinates), a job that fails is recorded
    (its job.json and sweep.json say why) and the sweep goes on, and sweep.json is rewritten after
    every job, so it shows progress while the sweep runs. SweepFailed at the end names the failures.
    A JobConfigError (the user's to fix, e.g. a pool that cannot be placed) is recorded and ends it;
    so does Ctrl-C.
    """
    job = load_job(path, list(overrides))
    stream = stream or sys.stdout
    checks = dict(overwrite=overwrite, allow_large=allow_large)
    if not job.runner.sweep:
        check_tracking(job.runner.tracking)
        prepared = preflight(job, **checks)
        return [_run_one(prepared, stream, _driver_settings(), overwrite=overwrite)]
    combos = expand(job.runner.sweep, Path(path).resolve().parent)
    jobs = []
    for i, coords in enumerate(combos):  # check every combination before any work starts
        sub = [*overrides, *(override(k, v) for k, v in coords.items())]
        sub.append(f"output={Path(job.runner.output) / folder_name(i, coords)}")
        sub_job = load_job(path, sub)
        check_tracking(sub_job.runner.tracking)
        jobs.append(preflight(sub_job, coords=coords, **checks))
    return _run_sweep(jobs, Path(job.runner.output) / "sweep.json", stream, overwrite=overwrite)


def _driver_settings() -> dict:
    # once per process, before any work: the driver's fusion and mixing sit on every step's barrier
    return {"driver_threads": limit_driver_threads(), "driver_malloc": keep_freed_memory()}


def _run_sweep(jobs: list[Prepared], index: Path, stream, *, overwrite: bool) -> list[JobOutcome]:
    driver, outcomes = _driver_settings(), []
    entries = [
        {"index": i, "coords": p.coords, "output": str(p.job.runner.output), "status": "pending"}
        for i, p in enumerate(jobs)
    ]
    write_json(index, entries)
    for i, prepared in enumerate(jobs):
        output = Path(prepared.job.runner.output)
        values = " ".join(f"{k}={v}" for k, v in (prepared.coords or {}).items())
        print(f"[sweep] job {i + 1}/{len(jobs)}: {values} -> {output}", file=stream, flush=True)
        try:
            outcome = _run_one(prepared, stream, driver, overwrite=overwrite)
        except KeyboardInterrupt:
            entries[i]["status"] = "interrupted"
            write_json(index, entries)
            raise
        except Exception as err:  # recorded in its job.json and in sweep.json
            reason = one_line(err)
            entries[i].update(status="failed", error=reason)
            write_json(index, entries)
            if isinstance(err, JobConfigError):  # the user's to fix (e.g. a pool that cannot be placed)
                raise
            print(f"[sweep] job {i + 1}/{len(jobs)} failed ({reason}); continuing", file=stream, flush=True)
            outcomes.append(JobOutcome(output, {"status": "failed", "error": reason}, None))
            continue
        entries[i]["status"] = outcome.record["status"]
        outcomes.append(outcome)
        write_json(index, entries)
    failed = [e for e in entries if e["status"] == "failed"]
    if failed:
        raise SweepFailed(failed, len(entries), index)
    return outcomes


def one_line(err: BaseException, limit: int = 300) -> str:
    """ "Type: first line of the message" of an error; for an error raised in a Ray task or actor,
    of the error it raised there (Ray's own message carries the remote traceback)."""
    import ray

    if isinstance(err, ray.exceptions.RayTaskError) and err.cause is not None:
        err = err.cause
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class SweepFailed(RuntimeError):
    """Some jobs of a sweep failed (each recorded); the others ran to the end."""

    def __init__(self, failed: list[dict], total: int, index: Path) -> None:
        self.failed = failed
        names = "; ".join(f"{Path(e['output']).name}: {e['error']}" for e in failed)
        super().__init__(f"{len(failed)} of {total} sweep jobs failed ({names}); see {index}")


class JobRecord:
    """job.json of one attempt, rewritten as the job goes (started, each checkpoint, ended)."""

    def __init__(self, prepared: Prepared, arts: JobArtifacts, attempt: Attempt, driver: dict) -> None:
        job = prepared.job
        self.arts = arts
        self.start = time.perf_counter()
        self.pool_summary: dict = {}
        self.result: Any = None
        self.last: dict[str, Any] = {}
        self.data: dict[str, Any] = {
            "task": job.task.name,
            "config": job.resolved,
            "sweep_coords": prepared.coords,
            "versions": versions(),
            "seed": getattr(job.config, "seed", None),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "attempt": attempt.number,
            "previous_attempts": attempt.previous,
            "replaced": attempt.replaced,
            "estimate": None if prepared.estimate is None else asdict(prepared.estimate),
            "driver_threads": driver["driver_threads"],
            "driver_malloc": driver["driver_malloc"],
        }

    def error(self, err: BaseException) -> None:
        trace = traceback.format_exc()
        self.data["error"] = {"type": type(err).__name__, "message": str(err), "traceback": trace}

    def write(self, status: str) -> None:
        """Rewrite job.json; at the end (any status but "running") complete it first with the finish
        time, source, run id and artifacts, and print the job's summary (runner/summary.py)."""
        arts, summary = self.arts, self.pool_summary
        timings = {"total_s": round(time.perf_counter() - self.start, 4)}
        timings.update({f"{k}_s": round(v, 4) for k, v in arts.timings.items()})
        if summary.get("model_s") is not None:
            timings["in_model_s"] = summary.get("model_s")
            timings["dispatch_overhead_s"] = summary.get("dispatch_overhead_s")
        record = {
            **self.data,
            "status": status,
            "finished": None,  # set by finish() when the job ends
            "fingerprint": None if arts.fingerprint is None else arts.fingerprint.as_dict(),
            "progress": arts.last_progress,
            "checkpoints": arts.checkpoints,
            "set_aside": arts.set_aside,
            "timings": timings,
            "pool": summary,
            "records": arts.records,
            "fallbacks": arts.fallbacks + pool_fallbacks(summary),
            "result": summarize(self.result),
        }
        if "attention" in summary:  # which layers served students, and how many calls fell back
            record["attention"] = summary["attention"]
        if status != "running":
            finish(record, arts)
        arts.save_json("job.json", record)
        self.last = record


def _run_one(prepared: Prepared, stream, driver: dict, *, overwrite: bool) -> JobOutcome:
    job = prepared.job
    output = Path(job.runner.output)
    if prepared.estimate is not None:
        print(f"estimate: {prepared.estimate.describe()}", file=stream, flush=True)
    attempt = open_output(output, overwrite=overwrite)
    pool_task = job.task.needs == "pool"
    name = f"{job.task.name}:{output.name}"
    tracker = (
        Tracker(output, job.runner.tracking, job.resolved, name=name)
        if job.task.needs in ("pool", "control")
        else None
    )
    arts = JobArtifacts(output, tracker, stream=stream, fingerprint=job_fingerprint(job))
    record = JobRecord(prepared, arts, attempt, driver)
    if not driver["driver_malloc"]["applied"]:
        arts.record_fallback("driver malloc defaults", driver["driver_malloc"]["reason"])
    arts.on_checkpoint = lambda: record.write("running")
    record.write("running")
    status = "failed"
    try:
        if "ray" not in driver:  # the first job of this process starts or joins Ray; the rest reuse it
            driver["ray"] = init_ray()
            print(driver["ray"].describe(), file=stream, flush=True)  # once, not per job of a sweep
        conn = driver["ray"]
        record.data["ray"] = asdict(conn)
        if conn.started and not conn.loopback:
            arts.record_fallback(
                "local Ray not on loopback",
                "Ray was imported before the runner could keep it on 127.0.0.1 (docs/reliability.md)",
            )
        if pool_task:
            record.result = _run_pool_task(job, arts, record)
        elif job.task.needs == "control":
            from runner.control.job import run_controller_task

            record.result, record.pool_summary = run_controller_task(job, arts)
        else:
            record.result = _run_device_task(job, arts)
        status = "succeeded"
    except KeyboardInterrupt as err:
        status = "interrupted"
        record.error(err)
        raise JobInterrupted(_where(arts, output)) from None
    except BaseException as err:  # recorded in job.json, then re-raised
        record.error(err)
        raise
    finally:
        record.write(status)
        if tracker is not None:
            tracker.end()
    return JobOutcome(output, record.last, record.result)


def _where(arts: JobArtifacts, output: Path) -> str:
    p = arts.last_progress
    at = f"at {p['label']} {p['done']}/{p['total']}" if p else "before the first step"
    saved = ", ".join(sorted(arts.checkpoints)) or "none yet"
    return (
        f"stopped {at}. {output} keeps job.json and the checkpoints written so far ({saved}); "
        "run the same command again to resume"
    )


def pool_fallbacks(pool_summary: dict) -> list[dict]:
    """The pool's designed fallbacks as job.json entries: batches split after running out of GPU
    memory, and batches re-run on another worker after theirs died."""
    out = []
    for s in pool_summary.get("oom_fallbacks", []):
        sizes = s["batch_sizes"]
        out.append(
            {
                "what": "oom batch split",
                "worker": s["worker"],
                "batch_sizes": sizes,
                "reason": f"worker {s['worker']}: batches of {sizes} views did not fit in GPU memory "
                "and ran in halves",
            }
        )
    for r in pool_summary.get("requeued_batches", []):
        out.append(
            {
                "what": "batch requeued",
                "worker": r["worker"],
                "batch": r["batch"],
                "reason": f"worker {r['worker']} was lost ({r['error']}); batch {r['batch']} ran on another",
            }
        )
    return out


def _run_pool_task(job: Job, arts: JobArtifacts, record: JobRecord) -> Any:
    """The task on the pool; the pool's summary reaches the record whether the task ends or fails."""
    import ray

    from runner.pool.pool import connect_pool
    from runner.pool.ray_pool import RayModelPool

    own = job.task.runner_fn()
    if own is not None:  # a pool task with its own context (task: distill)
        result, record.pool_summary = own(job, arts)
        return result
    with arts.timer("pool_connect"):
        pool = connect_pool(job.runner.pool, job.config.model)
    arts.fingerprint = arts.fingerprint.with_numerics(devices=device_kinds(pool.infos))
    model_pool = RayModelPool(pool, job.runner.pool)
    try:
        attention = getattr(job.config, "attention", None)
        if attention is not None:  # students served to this job's forwards (tasks/distill_attention.py)
            model_pool.serve_students(attention)
        return job.task.run_fn()(job.config, JobContext(arts, model_pool))
    finally:
        try:
            record.pool_summary = model_pool.summary()
            model_pool.close()
        except ray.exceptions.RayError as err:  # a lost worker: the rest of the record still counts
            arts.record("pool_summary_error", f"{type(err).__name__}: {err}")


def _run_device_task(job: Job, arts: JobArtifacts) -> Any:
    """A task that owns one device (training): in a GPU actor when the cluster has GPUs, else here."""
    from runner.device_task import run_device_task

    return run_device_task(job, arts)


def main_run(path: str, overrides: list[str], *, overwrite: bool = False, allow_large: bool = False) -> int:
    try:
        outcomes = run_job(path, overrides, overwrite=overwrite, allow_large=allow_large)
    except JobConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except JobInterrupted as err:
        print(f"interrupted: {err}", file=sys.stderr)
        return 130
    except SweepFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()
    for outcome in outcomes:
        print(f"done: {outcome.output / 'job.json'}")
    return 0
