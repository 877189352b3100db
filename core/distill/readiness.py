"""Readiness of one layer's student: when it may replace the teacher.

Per sampling run, the layer's validation captures (held out in the replay store, never trained on)
give cosine distances 1 - cos(student, teacher); `observe` collects them and `flush`, once per run,
folds their mean into an exponential moving average:

    EMA <- mean                                  at the first flush
    EMA <- decay EMA + (1 - decay) mean          after (decay 0.9)

One flush per run, not one per capture: the captures of one run are correlated (one prompt, one
seed, neighbouring steps), and a per-capture EMA swings with them. Then, with hysteresis so that a
layer near the threshold does not flip on every run:

    not ready -> ready       when EMA <= tau
    ready     -> not ready   when EMA >  exit_factor tau     (exit_factor 1.2)

and never ready before `min_updates` optimiser updates. Fail closed: a run with a non-finite
distance, or a non-finite last loss, makes the layer not ready (the EMA keeps its last finite
value, so one bad run does not poison it). `may_serve` is the gate at serving time: ready, a finite
output, and a finite last training loss at most `loss_ceiling`. The loss to pass is the unweighted
smooth_l1 + cosine_distance of the last update (UpdateStats): the Kendall-weighted total falls below
0 as the log-variances fall, so a ceiling on it would say little.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

READINESS_FORMAT = 1


@dataclass(frozen=True, kw_only=True)
class ReadinessConfig:
    """tau: the EMA cosine distance at which a layer becomes ready (0.01: cosine 0.99)."""

    tau: float = 0.01
    exit_factor: float = 1.2
    ema_decay: float = 0.9
    min_updates: int = 24
    loss_ceiling: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.tau < 2.0:
            raise ValueError(f"readiness.tau must be in (0, 2) (a cosine distance), got {self.tau}")
        if not self.exit_factor >= 1.0:
            raise ValueError(f"readiness.exit_factor must be >= 1, got {self.exit_factor}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"readiness.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.min_updates < 0:
            raise ValueError(f"readiness.min_updates must be >= 0, got {self.min_updates}")
        if not math.isfinite(self.loss_ceiling):
            raise ValueError(f"readiness.loss_ceiling must be finite, got {self.loss_ceiling}")


class LayerReadiness:
    """The readiness state of one layer (see the module docstring)."""

    def __init__(self, cfg: ReadinessConfig) -> None:
        self.cfg = cfg
        self.ema: float | None = None
        self.ready = False
        self.updates = 0
        self.last_loss: float | None = None
        self.flushes = 0
        self.failed_runs = 0  # flushes that saw a non-finite distance or loss
        self._pending: list[float] = []

    def observe(self, cosine_distance: float) -> None:
        """One validation capture's cosine distance in this run."""
        self._pending.append(float(cosine_distance))

    def flush(self, updates: int, last_loss: float) -> bool:
        """End of a sampling run: fold this run's distances into the EMA and decide; returns `ready`.

        updates: the layer's optimiser updates so far; last_loss: its last training loss.
        A run without observations leaves the EMA as it was (the decision is taken again).
        """
        pending, self._pending = self._pending, []
        self.updates, self.last_loss = int(updates), float(last_loss)
        self.flushes += 1
        finite = all(math.isfinite(x) for x in pending) and math.isfinite(self.last_loss)
        if not finite:
            self.failed_runs += 1
            self.ready = False
            return False
        if pending:
            mean = math.fsum(pending) / len(pending)
            d = self.cfg.ema_decay
            self.ema = mean if self.ema is None else d * self.ema + (1.0 - d) * mean
        if self.ema is None or self.updates < self.cfg.min_updates:
            self.ready = False
        elif self.ready:
            self.ready = self.ema <= self.cfg.exit_factor * self.cfg.tau
        else:
            self.ready = self.ema <= self.cfg.tau
        return self.ready

    def may_serve(self, last_loss: float | None, finite: bool) -> bool:
        """Fail closed: ready, the output `finite`, and a finite last loss at most the ceiling."""
        return (
            self.ready
            and bool(finite)
            and last_loss is not None
            and math.isfinite(last_loss)
            and last_loss <= self.cfg.loss_ceiling
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": READINESS_FORMAT,
            "config": asdict(self.cfg),
            "ema": self.ema,
            "ready": self.ready,
            "updates": self.updates,
            "last_loss": self.last_loss,
            "flushes": self.flushes,
            "failed_runs": self.failed_runs,
            "pending": list(self._pending),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != READINESS_FORMAT:
            raise ValueError(
                f"readiness state has format {state.get('format')!r}, this code reads {READINESS_FORMAT}"
            )
        if ReadinessConfig(**state["config"]) != self.cfg:
            raise ValueError(f"readiness state is for {state['config']}, this layer uses {asdict(self.cfg)}")
        self.ema = state["ema"]
        self.ready = bool(state["ready"])
        self.updates = int(state["updates"])
        self.last_loss = state["last_loss"]
        self.flushes = int(state["flushes"])
        self.failed_runs = int(state["failed_runs"])
        self._pending = [float(x) for x in state["pending"]]
