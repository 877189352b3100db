"""Running one job: validate, start or join Ray, bring up the pool, run the task, write job.json.

job.json holds the resolved config, package versions, the seed, timings (total, in-model, dispatch
overhead), views per step, the workers used and every fallback that ran. It is written even when
the task fails (with the error), so nothing already measured is lost.
"""

from __future__ import annotations

import importlib.metadata
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from runner.artifacts import write_json
from runner.config import Job, JobConfigError, load_job
from runner.context import JobArtifacts, JobContext
from runner.device_task import summarize
from runner.driver_process import keep_freed_memory, limit_driver_threads
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
    """Task-level checks that need the filesystem (inputs exist, sizes fit) before any work starts."""
    check = job.task.check_fn()
    if check is None:
        return
    try:
        check(job.config)
    except (ValueError, FileNotFoundError) as err:
        raise JobConfigError(str(err)) from None


@dataclass
class JobOutcome:
    output: Path
    record: dict[str, Any]
    result: Any


def run_job(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, stream=None
) -> list[JobOutcome]:
    """Run a job file (every job of its sweep, in order, on one shared pool); returns the outcomes.

    A sweep behaves like a set of Tune trials: every combination is validated and checked before any
    work starts; then each job is announced (index and coordinates), a job that fails is recorded
    (its job.json and sweep.json say why) and the sweep goes on, and sweep.json is rewritten after
    every job, so it shows progress while the sweep runs. SweepFailed at the end names the failures.
    A JobConfigError (the user's to fix, e.g. a pool that cannot be placed) is recorded and ends it.
    """
    job = load_job(path, list(overrides))
    # once per process, before any work: the driver's fusion and mixing sit on every step's barrier
    driver = {"driver_threads": limit_driver_threads(), "driver_malloc": keep_freed_memory()}
    if not job.runner.sweep:
        check_tracking(job.runner.tracking)
        return [_run_one(job, stream, driver)]
    combos = expand(job.runner.sweep, Path(path).resolve().parent)
    jobs = []
    for i, coords in enumerate(combos):  # validate every combination before any work starts
        sub = [*overrides, *(override(k, v) for k, v in coords.items())]
        sub.append(f"output={Path(job.runner.output) / folder_name(i, coords)}")
        sub_job = load_job(path, sub)
        check_job(sub_job)
        check_tracking(sub_job.runner.tracking)
        jobs.append((sub_job, coords))
    out = stream or sys.stdout
    index = Path(job.runner.output) / "sweep.json"
    entries = [
        {"index": i, "coords": c, "output": str(j.runner.output), "status": "pending"}
        for i, (j, c) in enumerate(jobs)
    ]
    write_json(index, entries)
    outcomes = []
    for i, (sub_job, coords) in enumerate(jobs):
        values = " ".join(f"{k}={v}" for k, v in coords.items())
        print(f"[sweep] job {i + 1}/{len(jobs)}: {values} -> {sub_job.runner.output}", file=out, flush=True)
        try:
            outcome = _run_one(sub_job, stream, driver, coords=coords)
        except Exception as err:  # recorded in its job.json and in sweep.json
            reason = one_line(err)
            entries[i].update(status="failed", error=reason)
            write_json(index, entries)
            if isinstance(err, JobConfigError):  # the user's to fix (e.g. a pool that cannot be placed)
                raise
            print(f"[sweep] job {i + 1}/{len(jobs)} failed ({reason}); continuing", file=out, flush=True)
            outcomes.append(
                JobOutcome(Path(sub_job.runner.output), {"status": "failed", "error": reason}, None)
            )
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


def _run_one(job: Job, stream, driver: dict, *, coords: dict | None = None) -> JobOutcome:
    start = time.perf_counter()
    check_job(job)
    output = Path(job.runner.output)
    output.mkdir(parents=True, exist_ok=True)
    pool_task = job.task.needs == "pool"
    tracker = (
        Tracker(output, job.runner.tracking, job.resolved, name=f"{job.task.name}:{output.name}")
        if job.task.needs in ("pool", "control")
        else None
    )
    arts = JobArtifacts(output, tracker, stream=stream or sys.stdout)
    record: dict[str, Any] = {
        "task": job.task.name,
        "config": job.resolved,
        "sweep_coords": coords,
        "versions": versions(),
        "seed": getattr(job.config, "seed", None),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    result, pool_summary, error = None, {}, None
    record.update(driver)
    if not driver["driver_malloc"]["applied"]:
        arts.record_fallback("driver malloc defaults", driver["driver_malloc"]["reason"])
    try:
        record["ray"] = init_ray()
        if pool_task:
            result, pool_summary = _run_pool_task(job, arts)
        elif job.task.needs == "control":
            from runner.control.job import run_controller_task

            result, pool_summary = run_controller_task(job, arts)
        else:
            result, pool_summary = _run_device_task(job, arts)
    except BaseException as err:  # recorded in job.json, then re-raised
        error = err
        record["error"] = {
            "type": type(err).__name__,
            "message": str(err),
            "traceback": traceback.format_exc(),
        }
        raise
    finally:
        total = time.perf_counter() - start
        record["timings"] = {
            "total_s": round(total, 4),
            **{f"{k}_s": round(v, 4) for k, v in arts.timings.items()},
        }
        if pool_summary:
            record["timings"]["in_model_s"] = pool_summary.get("model_s")
            record["timings"]["dispatch_overhead_s"] = pool_summary.get("dispatch_overhead_s")
        record["pool"] = pool_summary
        if "attention" in pool_summary:  # which layers served students, and how many calls fell back
            record["attention"] = pool_summary["attention"]
        record["records"] = arts.records
        record["fallbacks"] = arts.fallbacks + pool_fallbacks(pool_summary)
        record["result"] = summarize(result)
        record["status"] = "failed" if error else "succeeded"
        finish(record, arts)  # finish time, source, run id, artifacts; the console summary
        arts.save_json("job.json", record)
        if tracker is not None:
            tracker.end()
    return JobOutcome(output, record, result)


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


def _run_pool_task(job: Job, arts: JobArtifacts) -> tuple[Any, dict]:
    from runner.pool.pool import connect_pool
    from runner.pool.ray_pool import RayModelPool

    with arts.timer("pool_connect"):
        pool = connect_pool(job.runner.pool, job.config.model)
    model_pool = RayModelPool(pool, job.runner.pool)
    ctx = JobContext(arts, model_pool)
    try:
        attention = getattr(job.config, "attention", None)
        if attention is not None:  # students served to this job's forwards (tasks/distill_attention.py)
            model_pool.serve_students(attention)
        result = job.task.run_fn()(job.config, ctx)
    finally:
        summary = model_pool.summary()
        model_pool.close()
    return result, summary


def _run_device_task(job: Job, arts: JobArtifacts) -> tuple[Any, dict]:
    """A task that owns one device (training): in a GPU actor when the cluster has GPUs, else here."""
    from runner.device_task import run_device_task

    return run_device_task(job, arts)


def main_run(path: str, overrides: list[str]) -> int:
    try:
        outcomes = run_job(path, overrides)
    except JobConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except SweepFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        if ray.is_initialized():
            ray.shutdown()
    for outcome in outcomes:
        print(f"done: {outcome.output / 'job.json'}")
    return 0
