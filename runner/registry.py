"""The job types the runner knows: task name -> its config class, run function and pre-flight check.

Each is named as "module:attribute" and imported when first used, so `tessera status` does not
import torch and diffusers.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal


def _resolve(ref: str) -> Any:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class TaskEntry:
    """One job type.

    needs: "pool" (views fanned out to model workers), "device" (one process that owns a GPU) or
      "control" (the controller's rollout workers and central learner, runner/control/job.py).
    check: "" or a function of the config that checks what needs the filesystem (inputs exist and
      are usable) before any work starts; it raises ValueError or FileNotFoundError naming the field.
    inputs: the config fields that name input files or folders (dotted for nested fields; "" = none
      given); `tessera submit` checks and uploads them with the job (runner/package.py); every
      image among them is decoded in full before any work starts, and their bytes are part of
      the job's fingerprint (runner/fingerprint.py).
    models: config fields holding a ModelSpec; weights: the repository's weight folders the task
      loads itself (runner.models.WEIGHTS fields); both identify the weights in the fingerprint.
    artifact_settings: config fields that only choose which files are written (never a number), left
      out of the fingerprint.
    budgets: config fields a re-run may raise to continue the same job (a budget of optimizer
      updates): the task's own checkpoint state says how far it got, so they are left out of the
      fingerprint and of the settings a used output folder must agree with.
    estimate: "" or a function of the config returning a runner.estimate.Estimate (the size of the
      job, checked against the pixel budget before any work starts).
    runner: "" or a "module:function(job, artifacts) -> (result, pool summary)" that runs a pool task
      with a context of its own (distillation) instead of the model pool's.
    """

    name: str
    config: str
    run: str
    needs: Literal["pool", "device", "control"]
    check: str = ""
    inputs: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    weights: tuple[str, ...] = ()
    artifact_settings: tuple[str, ...] = ()
    budgets: tuple[str, ...] = ()
    estimate: str = ""
    runner: str = ""

    def unnumbered(self) -> tuple[str, ...]:
        """Config fields outside the job's fingerprint: artifact switches and budgets."""
        return self.artifact_settings + self.budgets

    def config_cls(self) -> type:
        return _resolve(self.config)

    def run_fn(self) -> Callable[[Any, Any], Any]:
        return _resolve(self.run)

    def check_fn(self) -> Callable[[Any], None] | None:
        return _resolve(self.check) if self.check else None

    def estimate_fn(self) -> Callable[[Any], Any] | None:
        return _resolve(self.estimate) if self.estimate else None

    def runner_fn(self) -> Callable[[Any, Any], tuple[Any, dict]] | None:
        return _resolve(self.runner) if self.runner else None


# The files an `attention:` block names (a students bundle, a controller): uploaded by submit, checked
# before work, and part of the checkpoints' fingerprint.
ATTENTION_INPUTS = ("attention.students", "attention.controller")

TASKS: dict[str, TaskEntry] = {
    "upscale": TaskEntry(
        "upscale",
        config="tasks.upscale_config:UpscaleConfig",
        run="tasks.upscale:run",
        needs="pool",
        check="tasks.upscale_config:check",
        inputs=("image", "mask", "outputs.reference", "model.prompt_embeds", *ATTENTION_INPUTS),
        models=("model",),
        artifact_settings=("outputs",),
        estimate="runner.estimate:upscale",
    ),
    "generate": TaskEntry(
        "generate",
        config="tasks.generate_config:GenerateConfig",
        run="tasks.generate:run",
        needs="pool",
        inputs=("model.prompt_embeds", *ATTENTION_INPUTS),
        models=("model",),
    ),
    "distill": TaskEntry(
        "distill",
        config="tasks.distill_config:DistillConfig",
        run="tasks.distill:run",
        needs="pool",
        inputs=("model.prompt_embeds",),
        models=("model",),
        runner="runner.distill.job:run_distill",
    ),
    "controller": TaskEntry(
        "controller",
        config="tasks.controller_config:ControllerConfig",
        run="tasks.controller:run",
        needs="control",
        check="runner.control.job:check",
        inputs=("students", "cost_table"),
        models=("model",),
        budgets=("updates",),
    ),
    "train_reference": TaskEntry(
        "train_reference",
        config="tasks.train_reference:TrainReferenceConfig",
        run="tasks.train_reference:run",
        needs="device",
        inputs=("train_dir", "eval_dir"),
        weights=("taef2",),
    ),
}
