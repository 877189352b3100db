"""Attention distillation: the job type behind `task: distill` (docs/distill.md).

Per-layer linear-time students (core/attention/student.py) are trained online from the teacher's
real attention during real sampling runs, across the pool's workers:

    plan = groups of layers, the list of teacher runs         core/distill/plan.py
    state = checkpoint or fresh                                resume is exact (tasks/distill_state.py)
    while runs remain:
        chunk = the next checkpoint_every runs
        for report in ctx.teacher_runs(chunk):                 run r on the worker owning group r mod G:
            state.finish(report); track                          sample + capture, train, validate
        checkpoint: states, replay state, students bundle      (drained: no run in flight)

A layer's training depends only on its group's runs and its own seeds, so the students do not
depend on the number of workers (given the same torch thread count and non-binding replay
budgets: eviction order across layers follows arrival order when workers insert in parallel).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass

from core.distill.plan import DistillPlan, TeacherRun
from tasks.distill_config import DistillConfig
from tasks.distill_context import DistillContext
from tasks.distill_records import LayerInfo, LayerSnapshot
from tasks.distill_state import DistillState

CHECKPOINT = "distill_checkpoint.pt"
STUDENTS = "students"


@dataclass(frozen=True)
class JobPlan:
    """The plan (core/distill/plan.py) laid out for this job: its layers, groups, runs and workers."""

    plan: DistillPlan
    layers: tuple[LayerInfo, ...]
    runs: tuple[TeacherRun, ...]
    workers: int

    @property
    def groups(self) -> dict[int, tuple[str, ...]]:
        return dict(enumerate(self.plan.groups))

    def assignment(self) -> dict:
        """job.json's layer assignment: groups, group -> worker, layer -> worker."""
        return {
            "groups": {str(g): list(keys) for g, keys in self.groups.items()},
            "group_worker": {str(g): self.plan.worker_of_group(g, self.workers) for g in self.groups},
            "layer_worker": self.plan.assignment(self.workers),
            "workers": self.workers,
        }


def plan_job(cfg: DistillConfig, model_layers: list[LayerInfo], workers: int) -> JobPlan:
    plan = cfg.plan([layer.key for layer in model_layers])
    runs = tuple(plan.run(i) for i in range(cfg.teacher.runs))
    layers = tuple(layer for layer in model_layers if layer.key in plan.layers)
    return JobPlan(plan, layers, runs, workers)


def run(cfg: DistillConfig, ctx: DistillContext) -> DistillState:
    plan = plan_job(cfg, ctx.layers(), ctx.workers)
    ctx.record("assignment", plan.assignment())
    ctx.record("runs", [dataclasses.asdict(r) for r in plan.runs])
    state = DistillState(fingerprint=fingerprint(cfg))
    saved = ctx.load_state(CHECKPOINT)
    if saved is not None:
        state.load_state_dict(saved)  # refuses a checkpoint of another config (the fingerprint)
        ctx.record("resumed_at_run", state.next_run)
    begun = ctx.begin(cfg, plan.groups, state.layer_states, state.replay)
    if state.replay is None:
        state.replay = begun
    meter = _Meter(cfg, plan, state)
    while state.next_run < len(plan.runs):
        chunk = plan.runs[state.next_run : state.next_run + cfg.checkpoint_every]
        for report in ctx.teacher_runs(chunk, states=state.layer_states, replay=state.replay):
            row = state.finish(report)
            ctx.log_metrics(row, step=report.run)
            meter.report(ctx, report)
            meter.run_timing(report)
        state.replay = ctx.replay_state()
        ctx.save_state(CHECKPOINT, state.state_dict())
        save_students(ctx, cfg, plan, state)
    ctx.record("summary", state.summary())
    ctx.record("throughput", meter.rates())
    ctx.record("run_timings", meter.runs)
    ctx.record("oom_ladders", state.ladders)
    ctx.record("layers", {k: dataclasses.asdict(r) for k, r in state.reports.items()})
    return state


def fingerprint(cfg: DistillConfig) -> dict:
    """What a checkpoint must agree with to be resumed: the whole config but the number of runs and
    the checkpoint and log cadences, which change neither a run nor any layer's training."""
    out = dataclasses.asdict(cfg)
    out["teacher"] = {k: v for k, v in out["teacher"].items() if k != "runs"}
    for key in ("checkpoint_every", "log_every"):
        out.pop(key)
    return json.loads(json.dumps(out))  # tuples as lists, as the checkpoint holds them


def save_students(ctx: DistillContext, cfg: DistillConfig, plan: JobPlan, state: DistillState) -> str:
    """The students bundle from the layers' latest states and reports."""
    owner = plan.assignment()["layer_worker"]
    snapshots = []
    for layer in plan.layers:
        trainer = state.layer_states.get(layer.key)
        report = state.reports.get(layer.key)
        if trainer is None or report is None:
            continue  # no run of its group yet
        snapshots.append(
            LayerSnapshot(
                key=layer.key,
                student=cfg.student.for_layer(layer.heads, layer.head_dim),
                weights=trainer["trainer"]["student"],
                ready=report.ready,
                may_serve=report.may_serve,
                readiness=trainer["readiness"],
                losses={
                    "loss": report.loss,
                    "smooth_l1": report.smooth_l1,
                    "cosine_distance": report.cosine_distance,
                    "nmse": report.nmse,
                    "val_cosine_distance": report.val_cosine_distance,
                    "ema_cosine_distance": report.ema_cosine_distance,
                },
                updates=report.updates,
                group=report.group,
                worker=owner[layer.key],
            )
        )
    meta = {"model": dataclasses.asdict(cfg.model), "runs_done": state.next_run, "runs": len(plan.runs)}
    return ctx.save_students(
        STUDENTS, snapshots, hyperparameters=dataclasses.asdict(cfg), assignment=plan.assignment(), meta=meta
    )


class _Meter:
    """Progress lines: one per `log_every` updates (and at the last run), with rates and the ETA."""

    def __init__(self, cfg: DistillConfig, plan: JobPlan, state: DistillState) -> None:
        self.cfg, self.total_runs = cfg, len(plan.runs)
        self.budget = cfg.training.updates * len(plan.layers)
        self.start = time.perf_counter()
        self.start_updates, self.start_captures, self.start_runs = (
            state.updates,
            state.captures,
            state.next_run,
        )
        self.state = state
        self.logged = state.updates // cfg.log_every
        self.runs: list[dict] = []  # per teacher run: where its time went (sampling with capture, training)

    def run_timing(self, report) -> None:
        """Keep a finished run's timings: sampling with capture vs training is the capture overhead's
        measure against a generation without capture (bench/README.md)."""
        self.runs.append(
            {
                "run": report.run,
                "group": report.group,
                "worker": report.worker,
                "captures": report.captures,
                "capture_bytes": report.capture_bytes,
                "sample_s": round(report.sample_s, 4),
                "train_s": round(report.train_s, 4),
                "capture_stall_s": round(report.capture_stall_s, 4),
                "capture_close_s": round(report.capture_close_s, 4),
                "capture_write_s": round(report.capture_write_s, 4),
            }
        )

    def rates(self) -> dict[str, float]:
        """This session's rates (a resumed job counts from its resume)."""
        s, elapsed = self.state, max(time.perf_counter() - self.start, 1e-9)
        return {
            "wall_s": round(elapsed, 3),
            "runs": s.next_run - self.start_runs,
            "updates_per_s": (s.updates - self.start_updates) / elapsed,
            "captures_per_s": (s.captures - self.start_captures) / elapsed,
        }

    def report(self, ctx: DistillContext, report) -> None:
        s = self.state
        if s.updates // self.cfg.log_every == self.logged and s.next_run < self.total_runs:
            return
        self.logged = s.updates // self.cfg.log_every
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        runs_rate = (s.next_run - self.start_runs) / elapsed
        eta = (self.total_runs - s.next_run) / runs_rate if runs_rate > 0 else float("nan")
        ready = sum(r.ready for r in s.reports.values())
        ctx.status(
            f"[distill] run {s.next_run}/{self.total_runs} | updates {s.updates}/{self.budget} | "
            f"{(s.updates - self.start_updates) / elapsed:.2f} updates/s | "
            f"{(s.captures - self.start_captures) / elapsed:.2f} captures/s | "
            f"ready {ready}/{len(s.reports)} | ETA {_duration(eta)}"
        )


def _duration(seconds: float) -> str:
    if seconds != seconds:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
