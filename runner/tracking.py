"""Metrics sinks: a local JSONL file always; Comet online (COMET_API_KEY in the environment) or
offline when the job asks.

- One step axis per run. Tasks count steps their own way (an upscale phase by its schedule's step
  index, so every phase starts again), and charts of one run would overlap; the tracker owns a
  global step (`GlobalSteps`) and the task's own step stays in each line as `task_step`.
- Each run has an id (`run_id`); every metrics.jsonl line carries it, and job.json records it.
- Comet is optional (`pip install 'tessera[comet]'`). comet_ml is imported lazily, after its
  network-touching features are turned off (docs/runner.md, Tracking). Online mode first tries one
  TCP connection to the Comet server: when nothing answers, the run logs offline (an archive under
  <output>/comet, `comet upload` later) and says so, rather than waiting on the network and dropping
  metrics; the fallback is recorded in job.json.
- At the end Comet gets the result and comparison images, job.json as an asset and the timing
  summary, with tags for the task, the model and the pool.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from runner.config import JobConfigError, TrackingConfig

COMET_URL = "https://www.comet.com/clientlib/"
CONNECT_TIMEOUT_S = 3.0
END_IMAGES = ("result.png", "comparison.png")


class TrackingUnavailable(JobConfigError):
    """Tracking that the job asks for and this machine cannot provide; the message says what to do."""


class GlobalSteps:
    """A task's step numbers on one increasing axis.

    A step lower than the last one, or the same step logging a key it already logged, starts a new
    segment right after the last global step (a new phase, counting from its own start); otherwise
    the task's steps keep their numbers and spacing (a training run's step 3000 stays 3000). So
    phases logging steps 10..19 and then 13..19 map to 10..19 and 20..26.
    """

    def __init__(self) -> None:
        self.offset = 0
        self.last: int | None = None
        self.last_global = -1
        self.keys: set[str] = set()

    def __call__(self, step: int, keys: set[str]) -> int:
        if self.last is not None and (step < self.last or (step == self.last and keys & self.keys)):
            self.offset = self.last_global + 1 - step
            self.keys = set()
        elif step != self.last:
            self.keys = set()
        self.last, self.last_global = step, self.offset + step
        self.keys |= keys
        return self.last_global


def new_run_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


class Tracker:
    def __init__(self, output: Path, cfg: TrackingConfig, params: Mapping[str, Any], name: str) -> None:
        self.output = Path(output)
        self.path = self.output / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.run_id = new_run_id()
        self.steps = GlobalSteps()
        self.fallbacks: list[dict] = []
        self.comet = None
        if cfg.comet != "off":
            self.comet = self._start_comet(cfg, params, name)

    def _start_comet(self, cfg: TrackingConfig, params: Mapping[str, Any], name: str):
        comet_ml = import_comet(cfg)
        common = dict(
            project_name=cfg.project,
            log_code=False,
            log_graph=False,
            auto_param_logging=False,
            auto_metric_logging=False,
            auto_output_logging=False,
            log_env_details=False,
            log_git_metadata=False,
            log_git_patch=False,
        )
        mode = cfg.comet
        if mode == "online":
            unreachable = comet_unreachable()
            if unreachable:
                mode = "offline"
                self._fallback(
                    "comet offline",
                    f"{unreachable}; logging offline to {self.output / 'comet'} "
                    "(upload later with `comet upload`)",
                )
        if mode == "online":
            experiment = comet_ml.Experiment(**common)
        else:
            experiment = comet_ml.OfflineExperiment(offline_directory=str(self.output / "comet"), **common)
        experiment.set_name(name)
        experiment.add_tags(tags(params))
        experiment.log_other("tessera_run_id", self.run_id)
        experiment.log_parameters(_flatten(params))
        return experiment

    def _fallback(self, what: str, reason: str) -> None:
        self.fallbacks.append({"what": what, "reason": reason})
        print(f"[fallback] {what}: {reason}", file=sys.stdout, flush=True)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        values = {k: float(v) for k, v in metrics.items()}
        global_step = self.steps(step, set(values))
        record = {
            "run_id": self.run_id,
            "time": time.time(),
            "step": global_step,
            "task_step": step,
            **values,
        }
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.comet is not None:
            self.comet.log_metrics(values, step=global_step)

    def end(self) -> None:
        """Send the end-of-job artifacts to Comet (job.json is written before this runs) and close."""
        if self.comet is None:
            return
        for name in END_IMAGES:
            if (self.output / name).is_file():
                self.comet.log_image(str(self.output / name), name=name)
        record = self.output / "job.json"
        if record.is_file():
            self.comet.log_asset(str(record), file_name="job.json")
            timings = json.loads(record.read_text()).get("timings", {})
            self.comet.log_others({f"timing.{k}": v for k, v in timings.items()})
        self.comet.end()


def import_comet(cfg: TrackingConfig):
    """comet_ml for a job whose tracking asks for Comet (checked before any work starts, and again
    where the tracker starts). Only comet_ml itself missing is "not installed"; an import error from
    inside an installed comet_ml (a broken dependency) propagates as it is."""
    os.environ.setdefault("COMET_ERROR_TRACKING_ENABLE", "false")
    os.environ.setdefault("COMET_DISABLE_AUTO_LOGGING", "1")
    try:
        import comet_ml
    except ModuleNotFoundError as err:
        if err.name != "comet_ml":
            raise
        raise TrackingUnavailable(
            f"tracking.comet={cfg.comet} needs comet_ml, which is not installed here: "
            "pip install 'tessera[comet]' (or set tracking.comet=off)"
        ) from None
    if cfg.comet == "online" and not os.environ.get("COMET_API_KEY"):
        raise TrackingUnavailable(
            "tracking.comet=online needs COMET_API_KEY in the environment (or tracking.comet=offline)"
        )
    return comet_ml


def check_tracking(cfg: TrackingConfig) -> None:
    """Raise TrackingUnavailable (a JobConfigError: one line, exit 2) if the job's tracking cannot run."""
    if cfg.comet != "off":
        import_comet(cfg)


def tags(params: Mapping[str, Any]) -> list[str]:
    """task:, model: and pool: tags from the resolved job config."""
    out = [f"task:{params.get('task', '?')}"]
    model = params.get("model")
    if isinstance(model, Mapping):
        path = str(model.get("path") or "").rstrip("/")
        out.append(f"model:{model.get('kind')}" + (f":{path.rsplit('/', 1)[-1]}" if path else ""))
    pool = params.get("pool")
    if isinstance(pool, Mapping):
        out.append(f"pool:{pool.get('name')}")
    return out


def comet_unreachable(timeout_s: float = CONNECT_TIMEOUT_S) -> str:
    """ "" when one TCP connection to the Comet server succeeds, else why it failed."""
    url = urlsplit(os.environ.get("COMET_URL_OVERRIDE") or COMET_URL)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return ""
    except OSError as err:
        return f"the Comet server {host}:{port} is unreachable ({err.strerror or type(err).__name__})"


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
