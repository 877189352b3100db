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
      given); `tessera submit` checks and uploads them with the job (runner/package.py).
    """

    name: str
    config: str
    run: str
    needs: Literal["pool", "device", "control"]
    check: str = ""
    inputs: tuple[str, ...] = ()

    def config_cls(self) -> type:
        return _resolve(self.config)

    def run_fn(self) -> Callable[[Any, Any], Any]:
        return _resolve(self.run)

    def check_fn(self) -> Callable[[Any], None] | None:
        return _resolve(self.check) if self.check else None


TASKS: dict[str, TaskEntry] = {
    "upscale": TaskEntry(
        "upscale",
        config="tasks.upscale_config:UpscaleConfig",
        run="tasks.upscale:run",
        needs="pool",
        check="tasks.upscale_config:check",
        inputs=("image", "mask", "outputs.reference"),
    ),
    "generate": TaskEntry(
        "generate",
        config="tasks.generate_config:GenerateConfig",
        run="tasks.generate:run",
        needs="pool",
    ),
    "controller": TaskEntry(
        "controller",
        config="tasks.controller_config:ControllerConfig",
        run="tasks.controller:run",
        needs="control",
        inputs=("students", "cost_table"),
    ),
    "train_reference": TaskEntry(
        "train_reference",
        config="tasks.train_reference:TrainReferenceConfig",
        run="tasks.train_reference:run",
        needs="device",
        inputs=("train_dir", "eval_dir"),
    ),
}
