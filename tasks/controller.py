"""`task: controller`: train the routing policy with REINFORCE from rollouts on the workers.

The loop (docs/controller.md):
1. start the rollout workers; each loads the model and the students bundle and times every layer's
   teacher and student attention once at the job's resolution (recorded per worker). The rewards
   use one cost table for all workers, so that a group's reward does not depend on the worker that
   ran it: the per-layer median over the workers, or a table recorded by an earlier run;
2. start the central learner (an actor holding the policy, AdamW and the baseline);
3. per update u: the learner's weights are sent once to every worker; each of the
   `prompts_per_update` groups (a seed keyed by (seed, u, g), a quality_speed from
   `quality_speeds` in turn) runs the teacher and K routed
   rollouts on whichever worker is free; the learner updates from all of them;
4. metrics every `log_every` updates, teacher/student image pairs every `image_every`, a checkpoint
   (learner state, cost table, metrics so far) every `checkpoint_every` and at the end; a re-run in
   the same output folder resumes from it exactly;
5. the trained controller (policy config and weights, the eligible layers, the cost table) is
   written to `controller.pt` for `attention: {controller: ...}` in generation and upscale jobs.
"""

from __future__ import annotations

import statistics

import numpy as np

from core.control.episode import GroupTask
from core.control.policy import PolicyConfig
from core.control.reward import CostTable, LayerTiming
from core.eval.pictures import grid, to_uint8
from core.flow.seeds import derive_seed
from tasks.controller_config import ControllerConfig, ControllerContext, GroupResult, WorkerInfo

CHECKPOINT = "checkpoint/controller_state"
CONTROLLER_FILE = "controller.pt"
CONTROLLER_FORMAT = "tessera-controller"
CONTROLLER_VERSION = 2  # 2: the policy sees quality_speed (1 did not; its files are refused)


def combined_cost_table(infos: list[WorkerInfo]) -> CostTable:
    """Per layer, the median over the workers of their measured teacher and student times."""
    first = infos[0].cost_table
    timings = []
    for layer in first.layers:
        rows = [next(t for t in i.cost_table.timings if t.layer == layer) for i in infos]
        timings.append(
            LayerTiming(
                layer,
                statistics.median(t.teacher_ms for t in rows),
                statistics.median(t.student_ms for t in rows),
            )
        )
    return CostTable(rows=first.rows, cols=first.cols, timings=tuple(timings))


def check_workers(infos: list[WorkerInfo]) -> None:
    """Every worker must see the same layers and servable students (one model, one bundle)."""
    ref = infos[0]
    for info in infos[1:]:
        if (info.layers, info.ready) != (ref.layers, ref.ready):
            raise RuntimeError(
                f"worker {info.worker} has layers {info.layers} / ready {info.ready}, worker {ref.worker} "
                f"{ref.layers} / {ref.ready}: the workers loaded different models or bundles"
            )


def group_tasks(cfg: ControllerConfig, update: int) -> list[GroupTask]:
    return [
        GroupTask(
            update,
            g,
            derive_seed(cfg.seed, "controller-prompt", update, g),
            cfg.group_quality_speed(update, g),
        )
        for g in range(cfg.prompts_per_update)
    ]


def image_pair(result: GroupResult) -> np.ndarray:
    """teacher | first rollout, side by side (uint8 [H, W, 3])."""
    pair = [to_uint8(result.teacher_image), to_uint8(result.student_image)]
    return grid(pair, cols=2, labels=["teacher", "routed k=0"])


def run(cfg: ControllerConfig, ctx: ControllerContext) -> dict:
    infos = ctx.start_workers(cfg)
    check_workers(infos)
    ctx.record(
        "worker_cost_tables",
        [{"worker": i.worker, "device": i.device, **i.cost_table.as_record()} for i in infos],
    )
    layers, ready = infos[0].layers, infos[0].ready
    if not ready:
        raise ValueError(f"students {cfg.students!r} has no layer that may serve: nothing to route")
    policy = PolicyConfig(layers=layers, hidden=cfg.hidden)
    learner = ctx.start_learner(policy, cfg.learner(), seed=cfg.seed)
    state = ctx.load_state(CHECKPOINT)
    history: list[dict] = []
    if state is not None:
        learner.load_state_dict(state["learner"])
        cost = CostTable.from_record(state["cost_table"])
        history = list(state["history"])
        start = int(state["update"])
        ctx.record("resumed_from_update", start)
    else:
        cost = (
            CostTable.from_record(ctx.read_json(cfg.cost_table))
            if cfg.cost_table
            else combined_cost_table(infos)
        )
        start = 0
    ctx.record("cost_table", cost.as_record())
    ctx.record("eligible_layers", list(ready))
    ctx.record("policy", policy.as_record())
    ctx.record("quality_speeds", list(cfg.quality_speeds))

    def checkpoint(done: int) -> None:
        ctx.save_state(
            CHECKPOINT,
            {
                "learner": learner.state_dict(),
                "cost_table": cost.as_record(),
                "history": history,
                "update": done,
            },
        )

    for u in range(start, cfg.updates):
        weights = learner.weights()  # broadcast: one copy of the new weights for every worker
        images = (u + 1) % cfg.image_every == 0
        with ctx.timer("rollouts"):
            results = ctx.run_groups(group_tasks(cfg, u), weights, cost, images=images)
        with ctx.timer("learner"):
            stats = learner.update([r for res in results for r in res.rollouts])
        history.append({"update": u + 1, **stats.as_metrics()})
        if (u + 1) % cfg.log_every == 0:
            ctx.log_metrics(stats.as_metrics(), step=u + 1)
        ctx.progress(
            "controller", u + 1, cfg.updates, unit="rollouts", count=(u + 1) * len(results) * cfg.rollouts
        )
        if images:
            ctx.save_image(f"pairs/update_{u + 1:05d}.png", image_pair(results[0]))
        if (u + 1) % cfg.checkpoint_every == 0 or u + 1 == cfg.updates:
            checkpoint(u + 1)
    final = learner.state_dict()
    ctx.save_state(
        CONTROLLER_FILE,
        {
            "format": CONTROLLER_FORMAT,
            "version": CONTROLLER_VERSION,
            "policy_config": final["policy_config"],
            "policy": final["policy"],
            "eligible": list(ready),
            "students": cfg.students,
            "cost_table": cost.as_record(),
            "quality_speeds": list(cfg.quality_speeds),
            "updates": final["step"],
        },
    )
    ctx.save_json("controller_history.json", history)
    last = history[-1] if history else {}
    return {
        "updates": final["step"],
        "last": last,
        "controller": CONTROLLER_FILE,
    }
