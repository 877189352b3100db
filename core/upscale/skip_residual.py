"""Skip residuals: mixing the sampler trajectory with the noise-inverted reference.

DemoFusion's skip residual (arXiv 2311.16973), as the Iterative Mixer runs it per step
(ttulttul/ComfyUI-Iterative-Mixer) and as the FlowMatching-Upscaler runs it once per stage
(docs/upscale.md, "Skip residual and rewind").

The reference at flow time sigma is z'_sigma = (1 - sigma) x_ref + sigma eps (flow-correct;
`core.flow.schedules.noise_to`). After the sampler steps to sigma_{k+1} it is mixed with z'_{k+1}, the
reference at the SAME sigma (the Mixer's off-by-one mixes z'_k).

Conventions:
- c1[k] (`step_schedule`) is the weight on the denoised trajectory at mix k; it rises 0 -> 1.
- `blend(kind, z_ref, x, c)` takes c as the weight on x (the trajectory), as upstream.
- `mix_with_reference(x, z_ref, weight, kind)` takes the weight on the reference, 1 - c.

Composition across phases [ours]: the reference weight at mix k of phase p is
    w[p, k] = s_p * (1 - c1[k]),
where s_p = `phase_strengths(phase_start, phase_end, phases)[p]` is the geometric per-phase strength
of the Upscaler (0.8 -> 0.05) and c1 the Mixer's per-step schedule. The first mix of the first phase gives
the reference s_0 (0.8 by default); the weight then decays with c1 inside the phase, and later
phases start lower.

Decisions where upstream divides by zero: the stop step is at least 1 (cosine/linear) and the
logistic's normaliser k_max = steps - 1 is at least 1, so one-step schedules are defined.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

ScheduleKind = Literal["cosine", "linear", "logistic"]
SCHEDULE_KINDS: tuple[ScheduleKind, ...] = ("cosine", "linear", "logistic")
BlendKind = Literal["addition", "slerp", "norm_only"]
BLEND_KINDS: tuple[BlendKind, ...] = ("addition", "slerp", "norm_only")
SLERP_MIN_SIN = 1e-3  # below this sin(omega), slerp falls back to lerp (the Inverter's guard)
ZERO_EPS = 1e-12  # norms at or below this count as zero vectors


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def step_schedule(
    kind: str,
    steps: int,
    *,
    alpha1: float = 2.4,
    start: float = 0.0,
    stop: float = 1.0,
    clamp: float = 1.0,
    blend_min: float = 0.0,
    blend_max: float = 1.0,
) -> list[float]:
    """c1[k], k = 0..steps-1: the weight on the denoised trajectory at each mix (the Mixer's schedules).

    start/stop/clamp are fractions of `steps`, mapped to indices by floor(fraction * steps).
    - cosine: (0.5 (1 - cos(pi k / S')))^alpha1 for k <= S' (S' = the stop step), 1 after; start ignored.
    - linear: k / S'; 1 after the stop step, 0 before the start step.
    - logistic: 1 / (1 + exp(-5 alpha1 (k / k_max - mid))), mid = ((stop + start) / 2) / k_max in
      steps, k_max = steps - 1; 1 after the stop step, 0 before the start step.
    Then c1[floor(clamp * steps):] = 1, then c1 <- blend_min + (blend_max - blend_min) c1.
    """
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"schedule kind must be one of {SCHEDULE_KINDS}, got {kind!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if alpha1 <= 0:
        raise ValueError(f"alpha1 must be > 0, got {alpha1}")
    for name, value in (("start", start), ("stop", stop), ("clamp", clamp)):
        _check_unit(name, value)
    for name, value in (("blend_min", blend_min), ("blend_max", blend_max)):
        _check_unit(name, value)
    if start > stop:
        raise ValueError(f"start must be <= stop, got start={start} stop={stop}")

    start_step = math.floor(start * steps)
    stop_step = math.floor(stop * steps)
    c1: list[float] = []
    if kind == "cosine":
        s = max(stop_step, 1)  # upstream divides by zero at stop = 0
        c1 = [1.0 if k > s else (0.5 * (1.0 - math.cos(math.pi * k / s))) ** alpha1 for k in range(steps)]
    elif kind == "linear":
        s = max(stop_step, 1)
        c1 = [1.0 if k > s else (0.0 if k < start_step else k / s) for k in range(steps)]
    else:
        k_max = max(steps - 1, 1)  # upstream raises for a one-step schedule
        mid = ((stop_step + start_step) / 2) / k_max
        steep = 5.0 * alpha1
        for k in range(steps):
            if k > stop_step:
                c1.append(1.0)
            elif k < start_step:
                c1.append(0.0)
            else:
                c1.append(1.0 / (1.0 + math.exp(-steep * (k / k_max - mid))))
    for k in range(math.floor(clamp * steps), steps):
        c1[k] = 1.0
    return [blend_min + (blend_max - blend_min) * c for c in c1]


def phase_strengths(start: float, end: float, phases: int) -> list[float]:
    """Geometric per-phase skip strengths with exact endpoints (the FlowMatching-Upscaler's).

    r = (end / start)^(1 / (S - 1)) with a zero endpoint replaced by 1e-6; w_i = start r^i, then
    w_0 = start and w_{S-1} = end exactly. S = 1 gives [start]. Example S = 3: [0.8, 0.2, 0.05].
    """
    _check_unit("phase strength start", start)
    _check_unit("phase strength end", end)
    if phases < 1:
        raise ValueError(f"phases must be >= 1, got {phases}")
    if phases == 1:
        return [start]
    a, b = (start if start > 0 else 1e-6), (end if end > 0 else 1e-6)
    r = (b / a) ** (1.0 / (phases - 1))
    values = [a * r**i for i in range(phases)]
    values[0], values[-1] = start, end
    return values


def linear_values(start: float, end: float, n: int) -> list[float]:
    """n values from start to end inclusive (the Upscaler's per-stage renoise); n = 1 gives [start]."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n == 1:
        return [start]
    return [start + i * (end - start) / (n - 1) for i in range(n)]


def _per_item(t: torch.Tensor, b: int) -> torch.Tensor:
    return t.reshape(b, -1).float()  # [B, N] fp32


def blend(kind: str, z_ref: torch.Tensor, x: torch.Tensor, c: float) -> torch.Tensor:
    """f(z', x, c) with c the weight on x, the trajectory (the Mixer's blends). Result in x's dtype.

    - addition: (1 - c) z' + c x.
    - slerp: per batch item on flattened vectors, omega = arccos(<z'/|z'|, x/|x|>), then
      sin((1 - c) omega)/sin(omega) z' + sin(c omega)/sin(omega) x; where sin(omega) <= 1e-3
      (parallel or antiparallel) or either vector is zero it is the lerp, so it never returns NaN.
    - norm_only: z' + c (|z'| x/|x| - z'). The REFERENCE z' keeps its norm: the result lerps between
      z' and x's direction scaled to |z'| (x contributes only its direction). Both ends have norm
      |z'|; for 0 < c < 1 the chord is shorter unless they are parallel. At c = 1 it returns
      |z'| x/|x|, not x. A zero x contributes nothing: (1 - c) z'.
    """
    if z_ref.shape != x.shape:
        raise ValueError(f"blend needs equal shapes, got z_ref {tuple(z_ref.shape)} and x {tuple(x.shape)}")
    if kind not in BLEND_KINDS:
        raise ValueError(f"blend kind must be one of {BLEND_KINDS}, got {kind!r}")
    if kind == "addition":
        return ((1.0 - c) * z_ref.float() + c * x.float()).to(x.dtype)
    b = x.shape[0]
    z, y = _per_item(z_ref, b), _per_item(x, b)  # [B, N]
    nz, ny = z.norm(dim=1, keepdim=True), y.norm(dim=1, keepdim=True)  # [B, 1]
    if kind == "norm_only":
        out = z + c * (nz * y / ny.clamp_min(ZERO_EPS) - z)
        return out.reshape(x.shape).to(x.dtype)
    dot = ((z / nz.clamp_min(ZERO_EPS)) * (y / ny.clamp_min(ZERO_EPS))).sum(dim=1, keepdim=True)
    omega = torch.arccos(dot.clamp(-1.0, 1.0))
    sin_omega = torch.sin(omega)
    lerp = (sin_omega <= SLERP_MIN_SIN) | (nz <= ZERO_EPS) | (ny <= ZERO_EPS)
    safe_sin = torch.where(lerp, torch.ones_like(sin_omega), sin_omega)
    wz = torch.where(lerp, torch.full_like(omega, 1.0 - c), torch.sin((1.0 - c) * omega) / safe_sin)
    wy = torch.where(lerp, torch.full_like(omega, c), torch.sin(c * omega) / safe_sin)
    return (wz * z + wy * y).reshape(x.shape).to(x.dtype)


def mix_with_reference(x: torch.Tensor, z_ref: torch.Tensor, weight: float, blend_kind: str) -> torch.Tensor:
    """Mix the trajectory x with the reference z' at the same sigma; `weight` is on the REFERENCE.

    Equals blend(blend_kind, z_ref, x, 1 - weight): weight 0 returns x (norm_only: x rescaled to |z'|).
    """
    _check_unit("reference weight", weight)
    return blend(blend_kind, z_ref, x, 1.0 - weight)


@dataclass(frozen=True, kw_only=True)
class SkipResidual:
    """Per-step skip residual: schedule, blend and the geometric per-phase strength.

    kind, alpha1, start, stop, clamp, blend_min, blend_max: the per-step c1 schedule (`step_schedule`).
    blend: how the trajectory and the reference are mixed.
    phase_start, phase_end: the reference strength of the first and the last phase, geometric between.
    """

    kind: str = "cosine"  # SCHEDULE_KINDS
    alpha1: float = 2.4
    start: float = 0.0
    stop: float = 1.0
    clamp: float = 1.0
    blend_min: float = 0.0
    blend_max: float = 1.0
    blend: str = "addition"  # BLEND_KINDS
    phase_start: float = 0.8
    phase_end: float = 0.05

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"skip_residual.kind must be one of {SCHEDULE_KINDS}, got {self.kind!r}")
        if self.blend not in BLEND_KINDS:
            raise ValueError(f"skip_residual.blend must be one of {BLEND_KINDS}, got {self.blend!r}")
        if not (self.alpha1 > 0 and math.isfinite(self.alpha1)):
            raise ValueError(f"skip_residual.alpha1 must be > 0, got {self.alpha1}")
        for name in ("start", "stop", "clamp", "blend_min", "blend_max", "phase_start", "phase_end"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"skip_residual.{name} must be in [0, 1], got {value}")
        if self.start > self.stop:
            raise ValueError(f"skip_residual.start must be <= stop ({self.stop}), got {self.start}")


def reference_weights(cfg: SkipResidual, steps: int, phase: int, phases: int) -> list[float]:
    """Weight on the reference at each of the `steps` mixes of phase `phase` (0-based) of `phases`.

    w[k] = s_phase * (1 - c1[k]): the geometric phase strength times the per-step schedule's reference
    share (module docstring). Mix k happens after the step to sigma_{k+1}, against z'_{k+1}.
    """
    if not 0 <= phase < phases:
        raise ValueError(f"phase must be in [0, {phases}), got {phase}")
    strength = phase_strengths(cfg.phase_start, cfg.phase_end, phases)[phase]
    c1 = step_schedule(
        cfg.kind,
        steps,
        alpha1=cfg.alpha1,
        start=cfg.start,
        stop=cfg.stop,
        clamp=cfg.clamp,
        blend_min=cfg.blend_min,
        blend_max=cfg.blend_max,
    )
    return [strength * (1.0 - c) for c in c1]


def rewind_ranges(steps: int, rewind_min: float, rewind_max: float) -> list[tuple[int, int]]:
    """Step ranges of the Iterative Mixer's rewind, as (start, steps) pairs.

    The first is (0, steps); then start <- start + floor((steps - start) rewind_min) while
    start <= floor(steps rewind_max). Stops when start no longer advances or reaches steps.
    Example: steps 100, 0.5, 0.8 -> [(0, 100), (50, 100), (75, 100)].
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    _check_unit("rewind_min", rewind_min)
    _check_unit("rewind_max", rewind_max)
    ranges = [(0, steps)]
    start, last = 0, math.floor(steps * rewind_max)
    while True:
        advance = math.floor((steps - start) * rewind_min)
        start += advance
        if advance == 0 or start > last or start >= steps:
            return ranges
        ranges.append((start, steps))


def stage_skip(y: torch.Tensor, u: torch.Tensor, w: float) -> torch.Tensor:
    """The Upscaler's post-sampler skip [comfy_compat]: (1 - w) y + w u, u the pre-noise upscale."""
    if y.shape != u.shape:
        raise ValueError(f"stage_skip needs equal shapes, got y {tuple(y.shape)} and u {tuple(u.shape)}")
    _check_unit("stage skip weight", w)
    return ((1.0 - w) * y.float() + w * u.float()).to(y.dtype)
