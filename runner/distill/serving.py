"""Serving a students bundle inside generation and upscale jobs (`attention:` in the job file).

`ServedStudents` holds a bundle's students on one process's device with a `StudentRoute` marking
the layers that may serve; `routed(transformer)` attaches the route for one forward and detaches it
after, so a pool worker shared by jobs serves students only to the job that asked for them. The
route fails closed (core/attention/routes.py): not ready, masked or non-finite calls go to the
teacher and are counted. Counters are taken per call (`take_counters`), travel with each batch's
result and are summed by the driver, so a batch re-run after a lost worker counts once.

With `attention.controller`, the routed layers are served by `ControlledStudents`
(runner/control/serving.py): each step routes only the layers the controller picks among them. The
decisions travel with the batches too; the driver keeps each step's once (`StudentsServing.note`),
prints it and writes them all into job.json.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn

from core.attention.counters import LayerCounters, RouteCounters
from core.attention.routes import StudentRoute
from core.control.inference import RoutingDecision
from core.models.attention_hook import LayerSet, attach, layer_keys
from runner.control.serving import ControlledStudents, TrainedController, load_controller
from runner.distill.bundle import StudentsBundle, load_bundle
from tasks.distill_attention import AttentionConfig


def routed_layers(
    bundle: StudentsBundle, cfg: AttentionConfig, available: tuple[str, ...]
) -> tuple[str, ...]:
    """The bundle's layers that serve under `cfg`: those that may serve, within cfg's layer set."""
    unknown = sorted(set(bundle.layers) - set(available))
    if unknown:
        raise ValueError(
            f"attention.students {cfg.students!r} has students for layers {unknown} that this model "
            f"does not have (its layers: {list(available)})"
        )
    allowed = set(cfg.selection().select(available)) if cfg.selection() is not None else set(available)
    return tuple(k for k in available if k in bundle.layers and k in allowed and bundle.layers[k].may_serve)


class ServedStudents:
    """The routed students of one job on one process (a pool worker or the in-process pool)."""

    def __init__(self, cfg: AttentionConfig, transformer: nn.Module, device: torch.device) -> None:
        bundle = load_bundle(cfg.students)
        self.cfg = cfg
        self.layers = routed_layers(bundle, cfg, tuple(layer_keys(transformer)))
        students = {k: bundle.layers[k].build(device) for k in self.layers}
        self.route = StudentRoute(students, ready=self.layers, min_image_tokens=cfg.min_image_tokens)
        control = cfg.control()
        self.controlled = (
            None
            if control is None
            else ControlledStudents(students, checked_controller(cfg), control)  # fails closed too
        )

    @contextlib.contextmanager
    def routed(self, transformer: nn.Module) -> Iterator[None]:
        """The route attached to the routed layers for the duration of the block (none: no-op)."""
        if self.controlled is not None:
            with self.controlled.routed(transformer):
                yield
            return
        if not self.layers:
            yield
            return
        with attach(transformer, self.route, LayerSet.parse(",".join(self.layers))):
            yield

    def take_counters(self) -> RouteCounters:
        """The counters since the last call, and a fresh set for the next."""
        if self.controlled is not None:
            return self.controlled.take_counters()
        taken, self.route.counters = self.route.counters, RouteCounters()
        return taken

    def take_decisions(self) -> list[RoutingDecision]:
        """The controller's decisions since the last call (each step's once); none without one."""
        return [] if self.controlled is None else self.controlled.take_decisions()


def checked_controller(cfg: AttentionConfig) -> TrainedController:
    """cfg's controller, which must have been trained on cfg's students bundle."""
    controller = load_controller(cfg.controller)
    if Path(controller.students).resolve() != Path(cfg.students).resolve():
        raise ValueError(
            f"attention.controller {cfg.controller!r} was trained on students {controller.students!r}, "
            f"not on attention.students {cfg.students!r}"
        )
    return controller


def add_counters(into: RouteCounters, other: RouteCounters) -> None:
    """Sum `other` into `into`, layer by layer (min_denominator: the minimum)."""
    for key, c in other.layers.items():
        mine = into.layer(key)
        for f in fields(LayerCounters):
            value = getattr(c, f.name)
            if f.name == "min_denominator":
                if value is not None:
                    mine.note_denominator(value)
            else:
                setattr(mine, f.name, getattr(mine, f.name) + value)


@dataclass
class StudentsServing:
    """The driver's side of serving: the bundle it checked, the layers the workers routed, and the
    job.json record built from the summed counters."""

    cfg: AttentionConfig
    bundle: StudentsBundle
    routed: tuple[str, ...] = ()
    decisions: dict[int | None, RoutingDecision] = field(default_factory=dict)  # step -> its decision
    console: TextIO | None = None  # where each step's decision is printed once

    @classmethod
    def check(cls, cfg: AttentionConfig) -> StudentsServing:
        if cfg.controller:
            checked_controller(cfg)  # a wrong or damaged controller fails the job before any work
        return cls(cfg, load_bundle(cfg.students))

    def note(self, decisions: list[RoutingDecision]) -> None:
        """Keep (and print) each step's decision once; the workers serving a step must agree."""
        for d in decisions:
            kept = self.decisions.setdefault(d.step, d)
            if kept is d:
                if self.console is not None:
                    layers = ",".join(d.student_layers) or "none"
                    print(
                        f"[attention] step {d.step} sigma {d.sigma:.4f} quality_speed {d.quality_speed:.3f} "
                        f"students: {layers}",
                        file=self.console,
                        flush=True,
                    )
            elif kept.student_layers != d.student_layers:
                raise RuntimeError(f"step {d.step}: workers decided {kept} and {d}: one decision per step")

    def record(self, counters: RouteCounters) -> dict[str, Any]:
        """job.json's `attention`: the bundle, the layers routed and why the others were not, and
        the route counters (per layer: calls, student, fallbacks by cause)."""
        total = counters.total()
        return {
            "students": self.cfg.students,
            "layers": self.cfg.layers,
            "min_image_tokens": self.cfg.min_image_tokens,
            "routed": list(self.routed),
            "not_routed": {k: _why_not(e) for k, e in self.bundle.layers.items() if k not in self.routed},
            "served_calls": total.student,
            "fallback_calls": total.fallbacks,
            "counters": counters.as_record(),
            "bundle_meta": self.bundle.meta,
            **(self._control_record() if self.cfg.controller else {}),
        }

    def _control_record(self) -> dict[str, Any]:
        return {
            "controller": self.cfg.controller,
            "policy": self.cfg.policy,
            "quality_speed": self.cfg.quality_speed,
            "decisions": [d.as_record() for d in self.decisions.values()],
        }


def _why_not(entry) -> str:
    if not entry.ready:
        return "not ready"
    if not entry.may_serve:
        return "last loss over the ceiling or not finite"
    return "not in attention.layers"
