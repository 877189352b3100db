"""Metrics sinks: a local JSONL file always; Comet online (COMET_API_KEY in the environment) or
offline when the job asks. comet_ml is imported lazily, after its network-touching features are
turned off (docs/runner.md, Tracking)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from runner.config import TrackingConfig


class Tracker:
    def __init__(self, output: Path, cfg: TrackingConfig, params: Mapping[str, Any], name: str) -> None:
        self.path = output / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.comet = None
        if cfg.comet != "off":
            os.environ.setdefault("COMET_ERROR_TRACKING_ENABLE", "false")
            os.environ.setdefault("COMET_DISABLE_AUTO_LOGGING", "1")
            import comet_ml

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
            if cfg.comet == "online":
                if not os.environ.get("COMET_API_KEY"):
                    raise RuntimeError("tracking.comet=online needs COMET_API_KEY in the environment")
                self.comet = comet_ml.Experiment(**common)
            else:
                self.comet = comet_ml.OfflineExperiment(offline_directory=str(output / "comet"), **common)
            self.comet.set_name(name)
            self.comet.log_parameters(_flatten(params))

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        record = {"time": time.time(), "step": step, **{k: float(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.comet is not None:
            self.comet.log_metrics(dict(metrics), step=step)

    def end(self) -> None:
        if self.comet is not None:
            self.comet.end()


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
