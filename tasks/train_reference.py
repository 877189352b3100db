"""Train the built-in reference model: a small Flux.1-architecture denoiser on TAEF2 latents.

Recipe (a feasibility run on an H100, docs/models.md, plus a schedule, an EMA and a crop bank):
rectified flow (core/flow/rectified_flow.py) with logit-normal times on standardised TAEF2 latents of
random multi-scale, flipped 256 px crops of the training photos (core/data/photo_crops.py); AdamW
with linear warm-up and a cosine decay to a floor; an EMA of the weights, which is what is
validated, sampled and returned. Validation: a fixed set of crops of the eval photos with a fixed
(t, eps) per crop, against the zero-velocity baseline on exactly the same inputs.

The run is a visible loop over typed state (tasks/train_reference_state.py): a `TrainState` with
state_dict / load_state_dict, checkpointed through ctx.save_state and restored on a re-run in the
same output folder (docs/state.md).

Decisions:
- Crops are encoded into a bank of latents on the device, rebuilt every `bank_refresh` steps;
  batches are drawn from it. Encoding a 256 px crop costs about as much as one training sample, so
  encoding per step would halve throughput; with the defaults each crop is used 16 times (fresh t
  and eps each time) and a bank of 16 384 crops takes about 4 s to build on an H100. Refreshing 4x
  as often changed the validation loss by < 0.001 (measured), so the cheaper setting stays.
- Every random draw is keyed by (seed, purpose, step or bank index) on CPU generators: bank r is a
  pure function of (seed, r), batch k of (seed, k). A checkpoint therefore needs no RNG state, and a
  resumed run equals an uninterrupted one (tests/test_train_reference.py).
- The validation crops and their (t, eps) are keyed by VALIDATION_SEED, not by `seed`, so runs with
  different seeds are compared on the same validation set; they use the training scale range
  without flips.
- Latent mean and std are measured once, on the first bank (refresh 0), and kept in the checkpoint.
- The host is synchronised only at log, validation and checkpoint points: losses are summed on the
  device. The per-step CPU draws are made one step ahead in a worker thread (StepDraws); on an H100
  this raised throughput from 12.3 to 18 steps/s (measured). Note: FluxBackbone.velocity still
  syncs the host once per call (float(sigma) for RoPE, CPU frequency tables copied to the device).
- Steps: the validation loss bottoms out after 3 000-4 000 steps and then rises by 0.002-0.005
  while the training loss keeps falling (the 124 training photos get memorised; measured with 5 000-
  and 8 000-step schedules), so the default is 5 000 steps, about 280 s of training on an H100.
- The runner disables cuDNN SDPA in the training process (its backward fails for this shape;
  runner/device_task.py); this module does not touch global backends.
- Images come through ctx.read_images and TAEF2 from the runner's weight folder (ctx.weights): the
  task opens no file itself.
- Outputs: `training.json` (the record), `samples.png`, and the EMA model in the reference-model
  folder layout (`model/`, `core.models.reference.save_reference`: bf16 safetensors shards); the
  model is also returned for callers that keep training or evaluate it.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch

from core.eval.pictures import grid, to_uint8
from core.flow.rectified_flow import (
    ValidationSet,
    make_validation_set,
    rectified_flow_loss,
    validation_loss,
    zero_velocity_loss,
)
from core.flow.sampling import sample_euler
from core.flow.schedules import get_sigmas
from core.flow.seeds import derive_seed, gaussian_noise
from core.models.reference import (
    REFERENCE_CONFIG,
    REFERENCE_NATIVE_SIZE,
    ReferenceDenoiser,
    ReferenceMeta,
    build_reference,
    save_reference,
)
from core.vae.adapters import TinyVae
from core.vae.taef2 import Taef2Decoder, Taef2Encoder, load_taef2
from tasks.context import TrainContext
from tasks.train_reference_state import (
    CropBank,
    CropSpec,
    StepDraws,
    StepMeter,
    TrainLog,
    TrainState,
    encode_crops,
)

CHECKPOINT = "checkpoint.pt"
VALIDATION_SEED = 0
SAMPLE_STEPS = 28
SAMPLE_MU = 0.5  # Flux's shift at 256 image tokens, a 256 px crop (core/flow/schedules.mu_for_tokens)


@dataclass(frozen=True, kw_only=True)
class TrainReferenceConfig:
    """Defaults: one run on one H100, measured: 18 steps/s, 5 000 steps in 278 s of training (295 s
    for run()), validation loss 1.029 = 0.508 x the zero-velocity loss (2.025)."""

    train_dir: str = "../shared/assets/images/train"
    eval_dir: str = "../shared/assets/images/eval"
    steps: int = 5000
    batch_size: int = 128
    lr: float = 6e-4
    warmup_steps: int = 200
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    lr_floor: float = 0.1  # final lr of the cosine, as a fraction of lr
    weight_decay: float = 0.01  # on tensors of >= 2 dims (matrices, learned tokens), not norms/biases
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    crop: int = 256
    min_scale: float = 1.0
    max_scale: float = 2.0
    flips: bool = True
    seed: int = 0
    val_crops: int = 256
    val_every: int = 1000
    checkpoint_every: int = 1000
    log_every: int = 50
    bank_size: int = 16384
    bank_refresh: int = 2048
    precision: Literal["bf16", "fp32"] = "bf16"  # bf16 autocast on CUDA; fp32 for CPU tests
    num_layers: int = 2
    num_single_layers: int = 4
    heads: int = 6
    head_dim: int = 64
    n_samples: int = 16

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "val_crops", "val_every", "checkpoint_every", "log_every")
        positive += ("bank_size", "bank_refresh", "num_layers", "heads", "n_samples")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "num_single_layers", "weight_decay", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.lr_floor <= 1.0:
            raise ValueError(f"train.lr_floor must be in [0, 1], got {self.lr_floor}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"train.lr_schedule must be cosine or constant, got {self.lr_schedule!r}")
        if not self.grad_clip > 0:
            raise ValueError(f"train.grad_clip must be > 0, got {self.grad_clip}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.crop < 16 or self.crop % 16:
            raise ValueError(
                f"train.crop must be a positive multiple of 16 (TAEF2 /8, 2x2 packing), got {self.crop}"
            )
        if self.min_scale < 1.0:
            raise ValueError(
                f"train.min_scale must be >= 1 (crops are never upsampled), got {self.min_scale}"
            )
        if self.max_scale < self.min_scale:
            raise ValueError(f"train.max_scale must be >= min_scale ({self.min_scale}), got {self.max_scale}")
        if self.bank_size < self.batch_size:
            raise ValueError(
                f"train.bank_size must be >= batch_size ({self.batch_size}), got {self.bank_size}"
            )
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"train.precision must be bf16 or fp32, got {self.precision!r}")
        if self.head_dim < 16 or self.head_dim % 16:
            raise ValueError(
                f"train.head_dim must be a positive multiple of 16 (RoPE axes), got {self.head_dim}"
            )


@dataclass(frozen=True)
class TrainReferenceResult:
    """The EMA model (float32, on ctx.device) with its meta, for save_reference; and the record."""

    model: ReferenceDenoiser
    meta: ReferenceMeta
    record: dict

    def summary(self) -> dict:
        """What job.json keeps: the final validation numbers."""
        return {**self.record["final"], "zero_velocity_loss": self.record["zero_velocity_loss"]}


def model_config(cfg: TrainReferenceConfig) -> dict:
    """REFERENCE_CONFIG with the size overrides; RoPE axes split head_dim 1/4 : 3/8 : 3/8 as (16, 24, 24)."""
    d = cfg.head_dim
    return REFERENCE_CONFIG | dict(
        num_layers=cfg.num_layers,
        num_single_layers=cfg.num_single_layers,
        num_attention_heads=cfg.heads,
        attention_head_dim=d,
        axes_dims_rope=(d // 4, 3 * d // 8, 3 * d // 8),
    )


def learning_rate(cfg: TrainReferenceConfig, step: int) -> float:
    """lr of update `step` (0-based): linear warm-up to lr, then cosine down to lr * lr_floor at `steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    floor = cfg.lr * cfg.lr_floor
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def centre_crop(image: torch.Tensor, multiple: int) -> torch.Tensor:
    """The centred crop of image [..., H, W] to multiples of `multiple` (TAEF2 needs /8)."""
    h, w = image.shape[-2:]
    nh, nw = h // multiple * multiple, w // multiple * multiple
    top, left = (h - nh) // 2, (w - nw) // 2
    return image[..., top : top + nh, left : left + nw].contiguous()


def _autocast(cfg: TrainReferenceConfig, device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")


def _photos(ctx: TrainContext, folder: str) -> list[torch.Tensor]:
    return [centre_crop(im, 8).to(ctx.device) for im in ctx.read_images(folder)]


def _taef2(ctx: TrainContext) -> tuple[Taef2Encoder, Taef2Decoder]:
    encoder, decoder = load_taef2(ctx.weights.taef2)
    return encoder.to(ctx.device).requires_grad_(False), decoder.to(ctx.device).requires_grad_(False)


def new_state(
    cfg: TrainReferenceConfig, encoder: Taef2Encoder, images: list[torch.Tensor], device: torch.device
) -> TrainState:
    """Step 0: a seeded model, its EMA, AdamW (weight decay on tensors of >= 2 dims), an empty bank."""
    model = build_reference(cfg.seed, model_config(cfg)).to(device).train()
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, fused=device.type == "cuda")
    spec = CropSpec(
        crop=cfg.crop,
        min_scale=cfg.min_scale,
        max_scale=cfg.max_scale,
        flips=cfg.flips,
        bf16=cfg.precision == "bf16",
    )
    bank = CropBank(encoder, images, spec, size=cfg.bank_size, refresh=cfg.bank_refresh, seed=cfg.seed)
    return TrainState(model, ema, optimizer, bank, TrainLog())


@dataclass(frozen=True)
class Validation:
    """The fixed validation inputs and the zero-velocity loss on them."""

    inputs: ValidationSet
    zero_loss: float


def validation_inputs(cfg: TrainReferenceConfig, state: TrainState, images: list[torch.Tensor]) -> Validation:
    """Crops of the eval photos keyed by VALIDATION_SEED, standardised by the bank's statistics."""
    raw = encode_crops(
        state.bank.encoder,
        images,
        state.bank.spec,
        cfg.val_crops,
        derive_seed(VALIDATION_SEED, "val crops"),
        flip=False,
    )
    inputs = make_validation_set(state.bank.standardise(raw), derive_seed(VALIDATION_SEED, "val noise"))
    return Validation(inputs, zero_velocity_loss(inputs, batch_size=cfg.batch_size).item())


def validate(cfg: TrainReferenceConfig, ctx: TrainContext, state: TrainState, val: Validation) -> None:
    with ctx.timer("validate"), torch.no_grad(), _autocast(cfg, ctx.device):
        ema_loss = validation_loss(state.ema.velocity, val.inputs, batch_size=cfg.batch_size).item()
        raw_loss = validation_loss(state.model.velocity, val.inputs, batch_size=cfg.batch_size).item()
    state.log.val.append([state.step, ema_loss, raw_loss])
    metrics = {"val/loss_ema": ema_loss, "val/loss_raw": raw_loss, "val/ratio_ema": ema_loss / val.zero_loss}
    ctx.log_metrics(metrics, step=state.step)


def save(ctx: TrainContext, state: TrainState) -> None:
    with ctx.timer("checkpoint"):
        ctx.save_state(CHECKPOINT, state.state_dict())


def train_step(
    cfg: TrainReferenceConfig, state: TrainState, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One AdamW update of the model and its EMA on one batch: (loss, gradient norm) on the device."""
    model, params = state.model, list(state.model.parameters())
    with _autocast(cfg, x0.device):
        loss = rectified_flow_loss(model.velocity, x0, t, eps)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    for group in state.optimizer.param_groups:
        group["lr"] = learning_rate(cfg, state.step)
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    decay = min(cfg.ema_decay, (1 + state.step) / (10 + state.step))  # EMA warm-up: early weights fade fast
    with torch.no_grad():  # else the EMA joins the autograd graph and holds every step's graph
        torch._foreach_lerp_(list(state.ema.parameters()), params, 1.0 - decay)
    return loss.detach(), grad_norm.detach()


def log_train(cfg: TrainReferenceConfig, ctx: TrainContext, state: TrainState, meter: StepMeter) -> None:
    loss, norm, rate = meter.flush(state.step)
    lr = learning_rate(cfg, state.step - 1)
    state.log.train.append([state.step, loss, norm, lr, rate])
    metrics = {"train/loss": loss, "train/grad_norm": norm, "train/lr": lr, "train/steps_per_s": rate}
    ctx.log_metrics(metrics, step=state.step)
    ctx.progress("train", state.step, cfg.steps, unit="steps")


def train(cfg: TrainReferenceConfig, ctx: TrainContext, state: TrainState, val: Validation) -> float:
    """The training loop, from state.step to cfg.steps; returns its wall time in seconds."""
    bank = state.bank
    shape = (cfg.batch_size, bank.encoder[-1].out_channels, cfg.crop // 8, cfg.crop // 8)
    meter, started = StepMeter(ctx.device, state.step), time.monotonic()
    draws = StepDraws(
        seed=cfg.seed,
        bank_size=cfg.bank_size,
        batch=cfg.batch_size,
        shape=shape,
        steps=cfg.steps,
        device=ctx.device,
    )
    with draws:
        while state.step < cfg.steps:
            if bank.stale(state.step):
                with ctx.timer("bank"):
                    bank.build(state.step)
            idx, t, eps = draws.take(state.step)
            meter.add(*train_step(cfg, state, bank.latents[idx], t, eps))
            state.step += 1
            # host syncs only below, every log_every / val_every / checkpoint_every steps
            if state.step % cfg.log_every == 0 or state.step == cfg.steps:
                log_train(cfg, ctx, state, meter)
            if state.step % cfg.val_every == 0 and state.step < cfg.steps:
                validate(cfg, ctx, state, val)
            if state.step % cfg.checkpoint_every == 0 and state.step < cfg.steps:
                save(ctx, state)
    bank.latents = None
    return time.monotonic() - started


def run(cfg: TrainReferenceConfig, ctx: TrainContext) -> TrainReferenceResult:
    started = time.monotonic()
    with ctx.timer("load_images"):
        train_images, eval_images = _photos(ctx, cfg.train_dir), _photos(ctx, cfg.eval_dir)
    encoder, decoder = _taef2(ctx)
    state = new_state(cfg, encoder, train_images, ctx.device)
    saved = ctx.load_state(CHECKPOINT)
    if saved is not None:
        state.load_state_dict(saved)
        ctx.progress("resumed", state.step, cfg.steps, unit="steps")
    with ctx.timer("bank"):
        if state.bank.mean is None:
            state.bank.build(0)  # measures the latent statistics
        val = validation_inputs(cfg, state, eval_images)
    ctx.record("latent_stats", {"mean": state.bank.mean, "std": state.bank.std})
    if saved is None:
        validate(cfg, ctx, state, val)
    train_s = train(cfg, ctx, state, val)
    if state.log.val[-1][0] != state.step:
        validate(cfg, ctx, state, val)
    save(ctx, state)
    meta = ReferenceMeta(
        latent_shift=state.bank.mean, latent_scale=1.0 / state.bank.std, native_size=REFERENCE_NATIVE_SIZE
    )
    ctx.save_image(
        "samples.png",
        samples(cfg, ctx, state.ema, TinyVae(encoder, decoder, meta.latent_shift, meta.latent_scale)),
    )
    resumed_from = None if saved is None else int(saved["step"])
    record = training_record(
        cfg, ctx, state, val, resumed_from=resumed_from, train_s=train_s, wall_s=time.monotonic() - started
    )
    ctx.save_json("training.json", record)
    save_reference(state.ema, ctx.directory("model"), meta)
    ctx.record("reference_training", record["final"] | {"zero_velocity_loss": val.zero_loss})
    return TrainReferenceResult(model=state.ema, meta=meta, record=record)


def samples(cfg: TrainReferenceConfig, ctx: TrainContext, ema: ReferenceDenoiser, vae: TinyVae) -> np.ndarray:
    """n_samples Euler samples of the EMA model from seeded noise, decoded, as one uint8 grid image."""
    device = ctx.device
    with ctx.timer("sample"), torch.no_grad(), _autocast(cfg, device):
        side = cfg.crop // 8
        noise = gaussian_noise(
            (cfg.n_samples, vae.latent_channels, side, side), derive_seed(cfg.seed, "samples")
        )
        x = sample_euler(
            lambda x, sigma, k: ema.velocity(x, torch.full((x.shape[0],), sigma, device=device)),
            noise.to(device),
            get_sigmas(SAMPLE_STEPS, SAMPLE_MU),
        )
    images = vae.decode(x.float()).cpu()
    return grid([to_uint8(im) for im in images], cols=math.ceil(math.sqrt(len(images))), pad=0)


def training_record(
    cfg: TrainReferenceConfig,
    ctx: TrainContext,
    state: TrainState,
    val: Validation,
    *,
    resumed_from: int | None,
    train_s: float,
    wall_s: float,
) -> dict:
    """training.json: config, model, statistics, the log rows, the final validation and the timings."""
    import diffusers

    zero, last = val.zero_loss, state.log.val[-1]
    start = resumed_from or 0
    return {
        "config": asdict(cfg),
        "model_config": {k: list(v) if isinstance(v, tuple) else v for k, v in model_config(cfg).items()},
        "parameters": sum(p.numel() for p in state.model.parameters()),
        "device": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "latent_mean": state.bank.mean,
        "latent_std": state.bank.std,
        "zero_velocity_loss": zero,
        "train": [
            {"step": int(r[0])} | dict(zip(("loss", "grad_norm", "lr", "steps_per_s"), r[1:], strict=True))
            for r in state.log.train
        ],
        "val": [
            {"step": int(s), "loss_ema": e, "loss_raw": r, "ratio_ema": e / zero, "ratio_raw": r / zero}
            for s, e, r in state.log.val
        ],
        "final": {
            "step": state.step,
            "val_loss_ema": last[1],
            "val_loss_raw": last[2],
            "ratio_ema": last[1] / zero,
        },
        "resumed_from": resumed_from,
        "train_time_s": train_s,
        "steps_per_s": (state.step - start) / train_s if state.step > start else 0.0,
        "wall_time_s": wall_s,
        "samples": {
            "n": cfg.n_samples,
            "steps": SAMPLE_STEPS,
            "mu": SAMPLE_MU,
            "seed": derive_seed(cfg.seed, "samples"),
        },
    }
