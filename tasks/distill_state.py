"""The distillation job's state that survives a restart (docs/state.md's pattern), and its metrics.

`DistillState` holds what a resumed job cannot recompute from its config: the next run, every
layer's state (trainer: student, optimizer, Kendall weights, counters, RNG; readiness; OOM ladder),
each layer's last report (for the bundle and the record), the replay stores' state (shard lists,
index, draw positions: the captures are referenced, not copied), the metric rows and the totals.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tasks.distill_records import LayerReport, RunReport

STATE_FORMAT = 1
QUANTILES = (("min", 0.0), ("p25", 0.25), ("p50", 0.5), ("p75", 0.75), ("max", 1.0))
SUMMARISED = ("loss", "cosine_distance", "nmse", "gate", "val_cosine_distance")


@dataclass
class DistillState:
    fingerprint: dict[str, Any] = field(default_factory=dict)  # the config a resume must match
    next_run: int = 0
    layer_states: dict[str, Any] = field(default_factory=dict)
    reports: dict[str, LayerReport] = field(default_factory=dict)  # each layer's latest
    replay: dict[str, Any] | None = None
    rows: list[dict[str, float]] = field(default_factory=list)  # one metrics row per run
    captures: int = 0
    capture_bytes: int = 0
    updates: int = 0
    ladders: dict[str, list] = field(default_factory=dict)

    def finish(self, report: RunReport) -> dict[str, float]:
        """Take a run's report in; returns its metrics row (per layer and across layers)."""
        if report.run != self.next_run:
            raise ValueError(f"run {report.run} reported, run {self.next_run} expected next")
        self.next_run += 1
        self.layer_states.update(report.states)
        self.captures += report.captures
        self.capture_bytes += report.capture_bytes
        for key, layer in report.layers.items():
            self.reports[key] = layer
            self.updates += layer.new_updates
            if layer.ladder:
                self.ladders[key] = layer.ladder
        row = {"run": float(report.run), **self.summary()}
        for key, layer in report.layers.items():
            for name in (*SUMMARISED, "ema_cosine_distance"):
                value = getattr(layer, name)
                if value is not None:
                    row[f"{key}/{name}"] = float(value)
            row[f"{key}/ready"] = float(layer.ready)
            row[f"{key}/updates"] = float(layer.updates)
        self.rows.append(row)
        return row

    def summary(self) -> dict[str, float]:
        """Cross-layer quantiles of each summarised metric, the ready count and the Pareto score
        ready x (1 - worst ready EMA cosine distance)."""
        out: dict[str, float] = {}
        layers = list(self.reports.values())
        for name in SUMMARISED:
            values = [getattr(r, name) for r in layers if getattr(r, name) is not None]
            for label, q in QUANTILES:
                if values:
                    out[f"{name}/{label}"] = quantile(values, q)
        ready = [r for r in layers if r.ready]
        worst = max((r.ema_cosine_distance for r in ready if r.ema_cosine_distance is not None), default=1.0)
        out["ready_layers"] = float(len(ready))
        out["pareto"] = len(ready) * (1.0 - worst) if ready else 0.0
        out["updates"] = float(self.updates)
        out["captures"] = float(self.captures)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "fingerprint": self.fingerprint,
            "next_run": self.next_run,
            "layer_states": self.layer_states,
            "reports": {k: dataclasses.asdict(r) for k, r in self.reports.items()},
            "replay": self.replay,
            "rows": self.rows,
            "captures": self.captures,
            "capture_bytes": self.capture_bytes,
            "updates": self.updates,
            "ladders": self.ladders,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(
                f"distill checkpoint has format {state.get('format')!r}, this code reads {STATE_FORMAT}"
            )
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(
                "the output folder holds the checkpoint of another distillation config; differing: "
                + ", ".join(_differences(state["fingerprint"], self.fingerprint))
                + " (use another output folder, or the config that made it)"
            )
        self.next_run = int(state["next_run"])
        self.layer_states = dict(state["layer_states"])
        self.reports = {k: LayerReport(**r) for k, r in state["reports"].items()}
        self.replay = state["replay"]
        self.rows = list(state["rows"])
        self.captures = int(state["captures"])
        self.capture_bytes = int(state["capture_bytes"])
        self.updates = int(state["updates"])
        self.ladders = dict(state["ladders"])


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of a non-empty sequence."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _differences(a.get(key), b.get(key), f"{where}.{key}" if where else key)
        return out
    return [] if a == b else [f"{where}={b!r} (checkpoint: {a!r})"]
