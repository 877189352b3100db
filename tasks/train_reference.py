"""Train the built-in reference model: a small Flux.1-architecture denoiser on TAEF2 latents.

Recipe (platform-notes.md §9 feasibility run, plus a schedule and EMA): rectified flow
(core/flow/rectified_flow.py) with logit-normal times on standardised TAEF2 latents of random
multi-scale, flipped 256 px crops of the training photos (core/data/photo_crops.py); AdamW with linear
warm-up and a cosine decay to a floor; an EMA of the weights, which is what is validated, sampled
and returned. Validation: a fixed set of crops of the eval photos with a fixed (t, eps) per crop,
against the zero-velocity baseline on exactly the same inputs.

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
  device. The per-step CPU draws (batch indices, t, eps: ~15 ms for batch 128) are made one step
  ahead in a worker thread and copied from pinned memory without blocking; on an H100 this raised
  throughput from 12.3 to 18 steps/s (measured). Note: FluxBackbone.velocity still syncs the host
  once per call (float(sigma) for RoPE, CPU frequency tables copied to the device).
- Steps: the validation loss bottoms out after 3 000-4 000 steps and then rises by 0.002-0.005
  while the training loss keeps falling (the 124 training photos get memorised; measured with 5 000-
  and 8 000-step schedules), so the default is 5 000 steps, about 280 s of training on an H100,
  well inside a 9-minute device command.
- The runner disables cuDNN SDPA in the training process (platform-notes.md §9: its backward fails
  for this shape); this module does not touch global backends.
- Outputs: `training.json` (the record), `samples.png`, and the EMA model in the reference-model
  folder layout (`model/`, `core.models.reference.save_reference`: bf16 safetensors shards); the
  model is also returned for callers that keep training or evaluate it.
"""

from __future__ import annotations

import copy
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from core.data.photo_crops import bank_batch, extract_crops, plan_crops
from core.flow.rectified_flow import (
    draw_flow_inputs,
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
from tasks.context import TrainContext

CHECKPOINT = "checkpoint.safetensors"
VALIDATION_SEED = 0
ENCODE_CHUNK = 256  # crops per TAEF2 call while filling a bank
SAMPLE_STEPS, SAMPLE_MU = 28, 0.5  # Flux's mu at 256 image tokens (algorithms.md §1)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


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
    time_limit_s: float = 530.0  # from run()'s start: stop training, then validate, save, sample
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
        if not self.time_limit_s > 0:
            raise ValueError(f"train.time_limit_s must be > 0, got {self.time_limit_s}")
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


def load_images(folder: str | Path) -> list[torch.Tensor]:
    """Every PNG/JPEG under folder (sorted, recursive): uint8 [3, H, W], centre-cropped to multiples of 8."""
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no PNG or JPEG images under {folder}")
    images = []
    for path in paths:
        with Image.open(path) as im:
            a = np.asarray(im.convert("RGB"))
        h, w = a.shape[0] // 8 * 8, a.shape[1] // 8 * 8
        top, left = (a.shape[0] - h) // 2, (a.shape[1] - w) // 2
        images.append(torch.from_numpy(np.array(a[top : top + h, left : left + w])).permute(2, 0, 1))
    return images


def _step_draws(
    cfg: TrainReferenceConfig, step: int, shape: tuple[int, ...], pin: bool
) -> tuple[torch.Tensor, ...]:
    """Bank indices, t and eps of training step `step` on the CPU, keyed by (seed, step); pinned for a
    non-blocking copy (no host sync) when the model is on a GPU."""
    idx = bank_batch(cfg.bank_size, cfg.batch_size, derive_seed(cfg.seed, "batch", step))
    draws = draw_flow_inputs(shape, derive_seed(cfg.seed, "flow", step))
    out = (idx, draws.t, draws.eps)
    return tuple(x.pin_memory() for x in out) if pin else out


class _Crops:
    """Crop sets encoded to raw TAEF2 latents on the device (float32)."""

    def __init__(self, cfg: TrainReferenceConfig, encoder: torch.nn.Module, device: torch.device) -> None:
        self.cfg, self.encoder, self.device = cfg, encoder, device

    @torch.no_grad()
    def encode(self, images: list[torch.Tensor], n: int, seed: int, *, flip: bool) -> torch.Tensor:
        cfg = self.cfg
        sizes = [tuple(im.shape[-2:]) for im in images]
        plan = plan_crops(
            sizes, n, seed, crop=cfg.crop, min_scale=cfg.min_scale, max_scale=cfg.max_scale, flip=flip
        )
        side = cfg.crop // 8
        out = torch.empty(n, self.encoder[-1].out_channels, side, side, device=self.device)
        for start in range(0, n, ENCODE_CHUNK):
            pixels = extract_crops(images, plan[start : start + ENCODE_CHUNK], crop=cfg.crop)
            with _autocast(cfg, self.device):
                out[start : start + ENCODE_CHUNK] = self.encoder(pixels).float()
        return out


def _autocast(cfg: TrainReferenceConfig, device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")


def _checkpoint(model, ema, optimizer, step, stats, logs) -> dict[str, torch.Tensor]:
    """Model, EMA and AdamW state flattened into named CPU tensors (safetensors), plus step and logs."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors |= {f"ema.{k}": v for k, v in ema.state_dict().items()}
    for i, state in optimizer.state_dict()["state"].items():
        tensors |= {f"optim.{i}.{k}": v for k, v in state.items()}
    tensors |= {"step": torch.tensor(step), "latent_stats": torch.tensor(stats, dtype=torch.float64)}
    tensors |= {f"log.{k}": torch.tensor(v, dtype=torch.float64) for k, v in logs.items() if v}
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def _restore(tensors, model, ema, optimizer) -> tuple[int, tuple[float, float], dict[str, list]]:
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    logs = {k[4:]: v.tolist() for k, v in tensors.items() if k.startswith("log.")}
    mean, std = tensors["latent_stats"].tolist()
    return int(tensors["step"]), (mean, std), logs


def _grid(images: torch.Tensor) -> torch.Tensor:
    """[n, 3, H, W] -> one [3, rows H, cols W] image, row-major, cols = ceil(sqrt(n))."""
    n, c, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = images.new_zeros(c, rows * h, cols * w)
    for i in range(n):
        grid[:, i // cols * h : (i // cols + 1) * h, i % cols * w : (i % cols + 1) * w] = images[i]
    return grid


def run(cfg: TrainReferenceConfig, ctx: TrainContext) -> TrainReferenceResult:
    import diffusers

    from core.vae.adapters import TinyVae
    from core.vae.taef2 import load_taef2

    t_start = time.monotonic()
    device = torch.device(ctx.device)
    with ctx.timer("load_images"):
        train_images = [im.to(device) for im in load_images(cfg.train_dir)]
        eval_images = [im.to(device) for im in load_images(cfg.eval_dir)]
    encoder, decoder = (m.to(device).requires_grad_(False) for m in load_taef2(ctx.weights.taef2))
    crops = _Crops(cfg, encoder, device)

    model = build_reference(cfg.seed, model_config(cfg)).to(device).train()
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    params, ema_params = list(model.parameters()), list(ema.parameters())
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, fused=device.type == "cuda")

    # rows of train: step, loss, grad_norm, lr, steps/s; of val: step, EMA loss, raw loss
    logs: dict[str, list] = {"train": [], "val": []}
    saved = ctx.load_tensors(CHECKPOINT)
    start, stats = 0, None
    if saved is not None:
        start, stats, restored = _restore(saved, model, ema, optimizer)
        logs |= restored
        ctx.progress("resumed", start, cfg.steps, unit="steps")
    bank_index, bank = -1, None
    with ctx.timer("bank"):
        if stats is None:  # measure the latent statistics on the first bank
            raw = crops.encode(train_images, cfg.bank_size, derive_seed(cfg.seed, "bank", 0), flip=cfg.flips)
            std_t, mean_t = torch.std_mean(raw)
            stats = (mean_t.item(), std_t.item())
            bank_index, bank = 0, (raw - stats[0]) / stats[1]
        raw_val = crops.encode(
            eval_images, cfg.val_crops, derive_seed(VALIDATION_SEED, "val crops"), flip=False
        )
    mean, std = stats
    val_set = make_validation_set((raw_val - mean) / std, derive_seed(VALIDATION_SEED, "val noise"))
    zero_loss = zero_velocity_loss(val_set, batch_size=cfg.batch_size).item()
    ctx.record("latent_stats", {"mean": mean, "std": std})

    def validate(step: int) -> None:
        with ctx.timer("validate"), torch.no_grad(), _autocast(cfg, device):
            ema_loss = validation_loss(ema.velocity, val_set, batch_size=cfg.batch_size).item()
            raw_loss = validation_loss(model.velocity, val_set, batch_size=cfg.batch_size).item()
        logs["val"].append([step, ema_loss, raw_loss])
        ctx.log_metrics(
            {"val/loss_ema": ema_loss, "val/loss_raw": raw_loss, "val/ratio_ema": ema_loss / zero_loss},
            step=step,
        )

    def save(step: int) -> None:
        with ctx.timer("checkpoint"):
            ctx.save_tensors(CHECKPOINT, _checkpoint(model, ema, optimizer, step, stats, logs))

    if start == 0:
        validate(0)
    latent_shape = (cfg.batch_size, encoder[-1].out_channels, cfg.crop // 8, cfg.crop // 8)
    loss_sum = torch.zeros((), device=device)
    norm_sum = torch.zeros((), device=device)
    step, stopped_early = start, False
    t_train, t_log, step_log = time.monotonic(), time.monotonic(), start
    pin = device.type == "cuda"
    with ThreadPoolExecutor(max_workers=1) as pool:  # draws step k + 1 on the CPU while step k runs
        pending = pool.submit(_step_draws, cfg, step, latent_shape, pin)
        while step < cfg.steps:
            if time.monotonic() - t_start > cfg.time_limit_s:
                stopped_early = True
                break
            if step // cfg.bank_refresh != bank_index:
                bank_index = step // cfg.bank_refresh
                with ctx.timer("bank"):
                    raw = crops.encode(
                        train_images, cfg.bank_size, derive_seed(cfg.seed, "bank", bank_index), flip=cfg.flips
                    )
                    bank = (raw - mean) / std
                    del raw
            # --- one training step ---------------------------------------------------------------------
            idx, t, eps = (x.to(device, non_blocking=True) for x in pending.result())
            if step + 1 < cfg.steps:
                pending = pool.submit(_step_draws, cfg, step + 1, latent_shape, pin)
            with _autocast(cfg, device):
                loss = rectified_flow_loss(model.velocity, bank[idx], t, eps)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            lr = learning_rate(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))  # EMA warm-up: early weights fade fast
            with torch.no_grad():  # else the EMA joins the autograd graph and holds every step's graph
                torch._foreach_lerp_(ema_params, params, 1.0 - decay)
            loss_sum += loss.detach()
            norm_sum += grad_norm.detach()
            step += 1
            # --- host syncs only below, every log_every / val_every / checkpoint_every steps -----------
            if step % cfg.log_every == 0 or step == cfg.steps:
                n = step - step_log
                loss_mean, norm_mean = loss_sum.item() / n, norm_sum.item() / n
                rate = n / (time.monotonic() - t_log)
                logs["train"].append([step, loss_mean, norm_mean, lr, rate])
                ctx.log_metrics(
                    {
                        "train/loss": loss_mean,
                        "train/grad_norm": norm_mean,
                        "train/lr": lr,
                        "train/steps_per_s": rate,
                    },
                    step=step,
                )
                ctx.progress("train", step, cfg.steps, unit="steps")
                loss_sum.zero_(), norm_sum.zero_()
                t_log, step_log = time.monotonic(), step
            if step % cfg.val_every == 0 and step < cfg.steps:
                validate(step)
            if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                save(step)
    train_s = time.monotonic() - t_train
    del bank

    if not logs["val"] or logs["val"][-1][0] != step:
        validate(step)
    save(step)
    meta = ReferenceMeta(latent_shift=mean, latent_scale=1.0 / std, native_size=REFERENCE_NATIVE_SIZE)
    with ctx.timer("sample"), torch.no_grad(), _autocast(cfg, device):
        side = cfg.crop // 8
        noise = gaussian_noise((cfg.n_samples, latent_shape[1], side, side), derive_seed(cfg.seed, "samples"))
        sigmas = get_sigmas(SAMPLE_STEPS, SAMPLE_MU)
        x = sample_euler(
            lambda x, sigma, k: ema.velocity(x, torch.full((x.shape[0],), sigma, device=device)),
            noise.to(device),
            sigmas,
        )
    samples = TinyVae(encoder, decoder, shift=meta.latent_shift, scale=meta.latent_scale).decode(x.float())
    ctx.save_image("samples.png", _grid(samples.cpu()))

    last = logs["val"][-1]
    record = {
        "config": asdict(cfg),
        "model_config": {k: list(v) if isinstance(v, tuple) else v for k, v in model_config(cfg).items()},
        "parameters": sum(p.numel() for p in params),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "latent_mean": mean,
        "latent_std": std,
        "zero_velocity_loss": zero_loss,
        "train": [
            {"step": int(r[0])} | dict(zip(("loss", "grad_norm", "lr", "steps_per_s"), r[1:], strict=True))
            for r in logs["train"]
        ],
        "val": [
            {
                "step": int(s),
                "loss_ema": e,
                "loss_raw": r,
                "ratio_ema": e / zero_loss,
                "ratio_raw": r / zero_loss,
            }
            for s, e, r in logs["val"]
        ],
        "final": {
            "step": step,
            "val_loss_ema": last[1],
            "val_loss_raw": last[2],
            "ratio_ema": last[1] / zero_loss,
        },
        "resumed_from": start if saved is not None else None,
        "stopped_early": stopped_early,
        "train_time_s": train_s,
        "steps_per_s": (step - start) / train_s if step > start else 0.0,
        "wall_time_s": time.monotonic() - t_start,
        "samples": {
            "n": cfg.n_samples,
            "steps": SAMPLE_STEPS,
            "mu": SAMPLE_MU,
            "seed": derive_seed(cfg.seed, "samples"),
        },
    }
    ctx.save_json("training.json", record)
    save_reference(ema, ctx.directory("model"), meta)
    ctx.record("reference_training", record["final"] | {"zero_velocity_loss": zero_loss})
    return TrainReferenceResult(model=ema, meta=meta, record=record)
