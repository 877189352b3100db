"""The state of a reference-model training run, as typed objects with state_dict / load_state_dict
(core/state.py, docs/state.md), and the per-step inputs that need no state because they are keyed.

`TrainState` is everything a resumed run needs, in one state_dict: the step, the model, its EMA,
the optimizer, the crop bank's latent statistics and the log rows. The learning rate is a function
of the step (`learning_rate` in tasks/train_reference.py), and every random draw is keyed by (seed,
purpose, step or bank index) on CPU generators, so no RNG state is saved and a resumed run equals an
uninterrupted one (tests/test_train_reference.py).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from core.data.photo_crops import bank_batch, extract_crops, plan_crops
from core.flow.rectified_flow import draw_flow_inputs
from core.flow.seeds import derive_seed
from core.models.reference import ReferenceDenoiser

ENCODE_CHUNK = 256  # crops per TAEF2 call while filling a bank


@dataclass(frozen=True, kw_only=True)
class CropSpec:
    """How crops are cut (side in pixels, the log-uniform scale range, flips) and encoded (bf16 autocast)."""

    crop: int
    min_scale: float
    max_scale: float
    flips: bool
    bf16: bool


@torch.no_grad()
def encode_crops(
    encoder: nn.Module, images: Sequence[torch.Tensor], spec: CropSpec, n: int, seed: int, *, flip: bool
) -> torch.Tensor:
    """n crops of `images` keyed by `seed`, encoded to raw TAEF2 latents [n, C, crop/8, crop/8]
    (float32, on the encoder's device; under bf16 autocast when spec.bf16)."""
    sizes = [tuple(im.shape[-2:]) for im in images]
    plan = plan_crops(
        sizes, n, seed, crop=spec.crop, min_scale=spec.min_scale, max_scale=spec.max_scale, flip=flip
    )
    device = next(encoder.parameters()).device
    side = spec.crop // 8
    out = torch.empty(n, encoder[-1].out_channels, side, side, device=device)
    for start in range(0, n, ENCODE_CHUNK):
        pixels = extract_crops(images, plan[start : start + ENCODE_CHUNK], crop=spec.crop)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.bf16):
            out[start : start + ENCODE_CHUNK] = encoder(pixels).float()
    return out


class CropBank:
    """Standardised training latents on the device: bank r holds `size` crops keyed by (seed, r) and
    serves steps r * refresh ... (r + 1) * refresh - 1. Encoding a crop costs about as much as one
    training sample, so a bank is reused for `refresh` steps (fresh t and eps each time).

    State: the latent mean and std, measured once on bank 0 (a bank is a pure function of the seed
    and its index, so it is rebuilt, never saved).
    """

    def __init__(
        self,
        encoder: nn.Module,
        images: Sequence[torch.Tensor],
        spec: CropSpec,
        *,
        size: int,
        refresh: int,
        seed: int,
    ) -> None:
        self.encoder, self.images, self.spec = encoder, images, spec
        self.size, self.refresh, self.seed = size, refresh, seed
        self.mean: float | None = None
        self.std: float | None = None
        self.index = -1
        self.latents: torch.Tensor | None = None

    def stale(self, step: int) -> bool:
        """Whether `step` needs a bank other than the one held."""
        return step // self.refresh != self.index

    def build(self, step: int) -> None:
        """Encode the bank for `step`; the first bank ever built also sets the latent statistics."""
        self.latents = None  # free the old bank before encoding the new one
        index = step // self.refresh
        raw = encode_crops(
            self.encoder,
            self.images,
            self.spec,
            self.size,
            derive_seed(self.seed, "bank", index),
            flip=self.spec.flips,
        )
        if self.mean is None:
            std, mean = torch.std_mean(raw)
            self.mean, self.std = mean.item(), std.item()
        self.latents, self.index = self.standardise(raw), index

    def standardise(self, raw: torch.Tensor) -> torch.Tensor:
        if self.mean is None or self.std is None:
            raise RuntimeError("the latent statistics are measured on the first bank: build it first")
        return (raw - self.mean) / self.std

    def state_dict(self) -> dict[str, Any]:
        return {"latent_mean": self.mean, "latent_std": self.std}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.mean, self.std = state["latent_mean"], state["latent_std"]
        self.index, self.latents = -1, None


@dataclass
class TrainLog:
    """The run's rows: train [step, loss, grad_norm, lr, steps/s]; val [step, EMA loss, raw loss]."""

    train: list[list[float]] = field(default_factory=list)
    val: list[list[float]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {"train": [list(r) for r in self.train], "val": [list(r) for r in self.val]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.train, self.val = [list(r) for r in state["train"]], [list(r) for r in state["val"]]


class TrainState:
    """Step, model, EMA, optimizer, crop bank and log: what a checkpoint holds (docs/state.md)."""

    def __init__(
        self,
        model: ReferenceDenoiser,
        ema: ReferenceDenoiser,
        optimizer: torch.optim.Optimizer,
        bank: CropBank,
        log: TrainLog,
    ) -> None:
        self.step = 0
        self.model, self.ema, self.optimizer, self.bank, self.log = model, ema, optimizer, bank, log

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "bank": self.bank.state_dict(),
            "log": self.log.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.bank.load_state_dict(state["bank"])
        self.log.load_state_dict(state["log"])


class StepDraws:
    """Each step's CPU draws (bank indices, t, eps), keyed by (seed, step), made one step ahead in a
    worker thread while the device runs the current step, and copied from pinned memory without
    blocking on a GPU (the draws take ~15 ms at batch 128; drawing them in line cost a third of an
    H100's step rate, measured)."""

    def __init__(
        self,
        *,
        seed: int,
        bank_size: int,
        batch: int,
        shape: tuple[int, ...],
        steps: int,
        device: torch.device,
    ) -> None:
        self.seed, self.bank_size, self.batch, self.shape, self.steps = seed, bank_size, batch, shape, steps
        self.device, self.pin = device, device.type == "cuda"
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending: tuple[int, Future] | None = None

    def __enter__(self) -> StepDraws:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True)

    def draw(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = bank_batch(self.bank_size, self.batch, derive_seed(self.seed, "batch", step))
        flow = draw_flow_inputs(self.shape, derive_seed(self.seed, "flow", step))
        out = (idx, flow.t, flow.eps)
        return tuple(x.pin_memory() for x in out) if self.pin else out  # type: ignore[return-value]

    def take(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Step `step`'s (bank indices, t, eps) on the device; starts drawing step + 1."""
        if self.pending is None or self.pending[0] != step:
            self.pending = (step, self.pool.submit(self.draw, step))
        draws = self.pending[1].result()
        self.pending = (step + 1, self.pool.submit(self.draw, step + 1)) if step + 1 < self.steps else None
        return tuple(x.to(self.device, non_blocking=True) for x in draws)  # type: ignore[return-value]


class StepMeter:
    """Losses and gradient norms summed on the device between log points (no host sync per step)."""

    def __init__(self, device: torch.device, step: int) -> None:
        self.loss = torch.zeros((), device=device)
        self.norm = torch.zeros((), device=device)
        self.since_step, self.since = step, time.monotonic()

    def add(self, loss: torch.Tensor, norm: torch.Tensor) -> None:
        self.loss += loss
        self.norm += norm

    def flush(self, step: int) -> tuple[float, float, float]:
        """(mean loss, mean gradient norm, steps/s) since the last flush; syncs the host."""
        n = step - self.since_step
        out = (self.loss.item() / n, self.norm.item() / n, n / (time.monotonic() - self.since))
        self.loss.zero_(), self.norm.zero_()
        self.since_step, self.since = step, time.monotonic()
        return out
