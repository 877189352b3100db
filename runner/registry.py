"""The job types the runner knows: task name -> its config class and run function.

Imports are lazy so `tessera status` does not import torch and diffusers.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class TaskEntry:
    name: str
    module: str
    config: str
    needs: Literal["pool", "device"]  # pool: views fanned out to model workers; device: one GPU process

    def config_cls(self) -> type:
        return getattr(importlib.import_module(self.module), self.config)

    def run_fn(self) -> Callable[[Any, Any], Any]:
        return importlib.import_module(self.module).run


TASKS: dict[str, TaskEntry] = {
    "upscale": TaskEntry("upscale", "tasks.upscale", "UpscaleConfig", "pool"),
    "train_reference": TaskEntry(
        "train_reference", "tasks.train_reference", "TrainReferenceConfig", "device"
    ),
}
