"""Job files: YAML + `key=value` overrides merged once with OmegaConf into frozen dataclasses.

A job file has the runner's keys (task, output, pool, tracking, sweep) and, beside them, the task's
own config fields. Both halves are checked against their dataclasses before any work starts: an
unknown key, a value of the wrong type or an invalid value raises `JobConfigError` naming the
field and the value.

Values are read as YAML 1.2 reads them (runner/job_values.py): `off`, `on`, `yes` and `no` are
strings, so `tracking.comet: off` means "off"; a boolean field still accepts them. A field that
holds a variable-length tuple accepts one scalar (`denoise=0.5`: one value for every phase).
`sweep=...` on the command line replaces the file's sweep (`sweep={}` turns it off). Resolvers
such as `${oc.env:...}` are refused: a job file never reads the environment, so job.json and output
paths never hold a secret.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

from runner.job_values import (
    JobValueError,
    parse_overrides,
    read_yaml,
    refuse_resolvers,
    wrap_scalars,
)
from runner.registry import TASKS, TaskEntry
from runner.storage import StorageError, is_uri, parse_location


class JobConfigError(ValueError):
    """A job file or override that cannot run; the message names the field and the value."""


@dataclass(frozen=True, kw_only=True)
class PoolConfig:
    """The named set of model workers a job runs on (reused across jobs while the cluster lives).

    workers: 0 = one per GPU in the cluster (one worker on a CPU-only cluster, or when no GPU node
      is up yet on an autoscaling cluster).
    device: where the workers run. "gpu": each reserves gpus_per_worker GPUs, and the job waits for
      them (an autoscaler sees the request); "cpu": no GPU; "auto": "gpu" for a model that needs
      one (Flux), else GPUs when the cluster has them and the CPU when it has none (recorded).
    gpus_per_worker: GPUs each GPU worker reserves (a fraction lets small models share a GPU).
    max_batch: views per forward; 0 = chosen from the worker's free memory.
    max_in_flight: batches queued per worker, so a worker never waits for its next input.
    gpu_memory_fraction: cap on each worker's share of its GPU's memory (sharing a GPU, or testing
      the out-of-memory fallback).
    idle_timeout_s: a worker that no job has called for this long releases itself (and its GPU, so
      an autoscaler can reclaim the node); 0 = never. A job silent this long counts as ended.
    placement_timeout_s: how long a job waits for workers to start (placed, their process up):
      an autoscaler adding nodes, other pools releasing theirs; at the start and for a lost
      worker's replacement; then it fails naming what is missing. On a local Ray started by the
      job, a pool that does not fit in the free resources fails at once.
    """

    name: str = "tessera"
    workers: int = 0
    device: Literal["auto", "cpu", "gpu"] = "auto"
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 1.0
    max_batch: int = 0
    max_in_flight: int = 2
    gpu_memory_fraction: float = 1.0
    idle_timeout_s: float = 300.0
    placement_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"pool.name must be letters, digits, - and _, got {self.name!r}")
        if self.workers < 0:
            raise ValueError(f"pool.workers must be >= 0, got {self.workers}")
        if not 0 < self.gpus_per_worker <= 8:
            raise ValueError(f"pool.gpus_per_worker must be in (0, 8], got {self.gpus_per_worker}")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"pool.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.max_batch < 0:
            raise ValueError(f"pool.max_batch must be >= 0, got {self.max_batch}")
        if not 0 < self.gpu_memory_fraction <= 1:
            raise ValueError(f"pool.gpu_memory_fraction must be in (0, 1], got {self.gpu_memory_fraction}")
        if self.max_in_flight < 1:
            raise ValueError(f"pool.max_in_flight must be >= 1, got {self.max_in_flight}")
        if self.device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"pool.device must be auto, cpu or gpu, got {self.device!r}")
        if self.idle_timeout_s < 0:
            raise ValueError(f"pool.idle_timeout_s must be >= 0 (0 = never), got {self.idle_timeout_s}")
        if self.placement_timeout_s < 0:
            raise ValueError(f"pool.placement_timeout_s must be >= 0, got {self.placement_timeout_s}")


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    """Metrics always go to metrics.jsonl in the output folder; Comet when asked (key from COMET_API_KEY)."""

    comet: Literal["off", "online", "offline"] = "off"
    project: str = "tessera"

    def __post_init__(self) -> None:
        if self.comet not in ("off", "online", "offline"):
            raise ValueError(f"tracking.comet must be off, online or offline, got {self.comet!r}")


@dataclass(frozen=True, kw_only=True)
class RunnerConfig:
    """task: the job type; sweep: a job array (runner/sweep.py).

    output: the job's folder: a path on the machine that runs the job, or a storage URI (file://,
      s3://, gs://, ...; runner/storage.py): the job then writes to a local staging folder, syncs it
      to the URI while it runs and at the end, and a re-run pulls it first and resumes.
    """

    task: str
    output: str
    pool: PoolConfig = field(default_factory=PoolConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.output:
            raise ValueError("output must name the job's folder (a path or a storage URI), got ''")
        if is_uri(self.output):
            try:
                parse_location(self.output)
            except StorageError as err:
                raise ValueError(f"output: {err}") from None


RUNNER_KEYS = ("task", "output", "pool", "tracking", "sweep")


@dataclass(frozen=True)
class Job:
    runner: RunnerConfig
    task: TaskEntry
    config: Any  # the task's frozen config dataclass
    resolved: dict  # the merged plain config, for job.json


def _describe(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or ""
    msg = str(err).splitlines()[0]
    return f"{key}: {msg}" if key else msg


def _merge(schema_cls: type, data: dict, overrides: dict, where: str) -> tuple[Any, dict]:
    base = OmegaConf.structured(schema_cls)
    OmegaConf.set_readonly(base, False)
    try:
        layers = [OmegaConf.create(wrap_scalars(schema_cls, d)) for d in (data, overrides)]
        merged = OmegaConf.merge(base, *layers)
        obj = OmegaConf.to_object(merged)
    except ConfigKeyError as err:
        raise JobConfigError(f"{where}: unknown key {_describe(err)}") from None
    except MissingMandatoryValue as err:
        raise JobConfigError(f"{where}: missing required value {_describe(err)}") from None
    except ValidationError as err:
        raise JobConfigError(f"{where}: invalid value {_describe(err)}") from None
    except OmegaConfBaseException as err:
        raise JobConfigError(f"{where}: {_describe(err)}") from None
    except ValueError as err:  # __post_init__ validation names the field and the value
        raise JobConfigError(f"{where}: {err}") from None
    except TypeError as err:  # e.g. a dataclass field without a default left unset
        raise JobConfigError(f"{where}: {err}") from None
    return obj, OmegaConf.to_container(merged, resolve=True)


def read_job_file(path: str | Path) -> dict:
    """A job file's mapping, read with YAML 1.2 booleans; resolvers are refused."""
    path = Path(path)
    if not path.is_file():
        raise JobConfigError(f"job file {str(path)!r} does not exist")
    try:
        data = read_yaml(path.read_text())
    except JobValueError as err:
        raise JobConfigError(f"job file {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise JobConfigError(f"job file {str(path)!r} must be a mapping of keys, got {type(data).__name__}")
    try:
        refuse_resolvers(data)
    except JobValueError as err:
        raise JobConfigError(f"job file {str(path)!r}: {err}") from None
    return data


def load_job(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Job:
    """Parse, merge and validate a job file with `key=value` overrides; raises JobConfigError."""
    data = read_job_file(path)
    try:
        over = parse_overrides(overrides)
    except JobValueError as err:
        raise JobConfigError(str(err)) from None
    runner_data = {k: data.pop(k) for k in RUNNER_KEYS if k in data}
    runner_over = {k: over.pop(k) for k in RUNNER_KEYS if k in over}
    if "sweep" in runner_over and not (
        isinstance(runner_over["sweep"], dict) and _dotted_only(overrides, "sweep")
    ):
        runner_data.pop("sweep", None)  # sweep=... replaces the file's sweep; sweep={} turns it off
    task_name = runner_over.get("task", runner_data.get("task"))
    if task_name is None:
        raise JobConfigError(f"{path}: missing required key 'task' (one of {sorted(TASKS)})")
    if task_name not in TASKS:
        raise JobConfigError(f"{path}: task {task_name!r} is not a known task; known: {sorted(TASKS)}")
    if "output" not in runner_data and "output" not in runner_over:
        raise JobConfigError(f"{path}: missing required key 'output' (the job's output folder)")
    entry = TASKS[task_name]
    runner_cfg, runner_resolved = _merge(RunnerConfig, runner_data, runner_over, str(path))
    task_cfg, task_resolved = _merge(entry.config_cls(), data, over, str(path))
    return Job(runner_cfg, entry, task_cfg, {**runner_resolved, **task_resolved})


def _dotted_only(overrides: list[str] | tuple[str, ...], key: str) -> bool:
    """True when every override of `key` names a key inside it (sweep.seed=[..]), none `key` itself."""
    keys = [o.split("=", 1)[0].strip() for o in overrides]
    return key not in keys
