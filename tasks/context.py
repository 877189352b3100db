"""What a task may ask of the runner. Tasks import only this protocol; `runner/` implements it.

A task is a frozen config dataclass plus `run(cfg, ctx)`. Everything that touches processes, GPUs and
files goes through `ctx`: fanning views out to model workers, the VAE, artifacts, checkpoints,
metrics and progress lines. Tests can drive a task with the runner's in-process context.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

import numpy as np
import torch

from core.models.backbone import Cond
from core.models.loading import WeightFolders
from core.tiling.views import ViewInput


class Artifacts(Protocol):
    """Files under the job's output directory, metrics and progress. Names are relative paths."""

    def read_image(self, path: str) -> torch.Tensor:
        """An input image (PNG/JPEG) as float [1, 3, H, W] in [0, 1]."""
        ...

    def directory(self, name: str) -> str:
        """A folder under the output directory, created, for a library saver (e.g. save_pretrained)."""
        ...

    def save_image(self, name: str, image: torch.Tensor | np.ndarray) -> str:
        """Write a PNG: a float tensor [3, H, W] (or [1, 3, H, W]) in [0, 1], or uint8 [H, W, 3]."""
        ...

    def save_json(self, name: str, data: Any) -> str: ...

    def save_tensors(self, name: str, tensors: Mapping[str, torch.Tensor]) -> str:
        """A safetensors checkpoint (atomic write: a crash never leaves half a file)."""
        ...

    def load_tensors(self, name: str) -> dict[str, torch.Tensor] | None:
        """A checkpoint written earlier by this job (resume), or None."""
        ...

    def save_state(self, name: str, state: Mapping[str, Any]) -> str:
        """Checkpoint a `state_dict()` (core.state.Stateful): a nested structure of tensors, numbers,
        strings, lists and dicts, written atomically (a crash never leaves half a file)."""
        ...

    def load_state(self, name: str) -> dict[str, Any] | None:
        """A state written earlier by save_state under `name` (resume), or None; tensors on the CPU."""
        ...

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None: ...

    def progress(
        self, label: str, done: int, total: int, *, unit: str = "views", count: int | None = None
    ) -> None:
        """One progress line: label, done/total, rate and ETA (count = work units done, for the rate)."""
        ...

    def record(self, key: str, value: Any) -> None:
        """A fact for job.json (derived seeds, schedules, mode flags, metrics)."""
        ...

    def record_fallback(self, what: str, reason: str) -> None:
        """A designed fallback that ran (lanczos -> bicubic, a batch split after OOM): goes to job.json."""
        ...

    def timer(self, name: str) -> AbstractContextManager[None]:
        """Accumulates wall time under `name` in job.json's timings."""
        ...


class ModelPool(Protocol):
    """The loaded model, wherever it runs: one process here, or one Ray actor per GPU."""

    latent_channels: int
    native_size: int
    vae_scale_factor: int

    def cond(self) -> Cond:
        """The job's conditioning (prompt embeddings or the model's learned tokens), computed once."""
        ...

    def evaluate(self, views: Sequence[ViewInput]) -> list[torch.Tensor]:
        """Velocities for views, in order; batches spread over every worker."""
        ...

    def encode(self, images: torch.Tensor, *, tile: int = 0) -> torch.Tensor:
        """Images [1, 3, H, W] in [0, 1] -> model-space latents. tile: 0 = one pass; else tiles of this
        many image pixels with exact GroupNorm statistics, spread over the pool."""
        ...

    def decode(self, latents: torch.Tensor, *, tile: int = 0) -> torch.Tensor:
        """Model-space latents [1, C, h, w] -> images in [0, 1]; tile as for encode, in image pixels
        (docs/vae.md)."""
        ...


class UpscaleContext(Artifacts, ModelPool, Protocol):
    """An upscale task's context: artifacts plus the model pool."""


class TrainContext(Artifacts, Protocol):
    """A training task runs in one process that owns `device`.

    weights: the folders of the repository's own weights (TAEF2, the reference model), as the
    runner resolved them (runner/models.py).
    """

    device: torch.device
    weights: WeightFolders

    def read_images(self, folder: str) -> list[torch.Tensor]:
        """Every PNG and JPEG under `folder` (recursive, sorted by path) as uint8 [3, H, W] on the CPU;
        FileNotFoundError when there is none."""
        ...
