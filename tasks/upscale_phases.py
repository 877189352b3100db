"""The upscale job planned up front: one PhaseSpec per phase, decided before any model call.

A phase is data: its size, schedule, seed, local and global view plans, skip-residual weights,
mask, refinement pass and kind. The task's loop (tasks/upscale.py) only carries it out. A clean-up
phase is the same record with no resize, no skip residual, no global path and no refinement,
so no flag switches behaviour inside the loop (docs/upscale.md, "Phases").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from core.flow.schedules import get_sigmas, img2img_sigmas, mu_for_tokens
from core.flow.seeds import derive_seed
from core.tiling.dilated import DilatedPlan
from core.upscale.fft_blend import refinement_applies, refinement_plan
from core.upscale.phases import PhaseSize, cleanup_seed, next_seed, phase_seeds, plan_phase_sizes
from core.upscale.resize import resize_mask
from core.upscale.skip_residual import (
    BlendKind,
    linear_values,
    phase_strengths,
    reference_weights,
    rewind_ranges,
)
from tasks.upscale_config import TilingConfig, UpscaleConfig
from tasks.upscale_plans import Geometry, LocalPlan, build_global_plan, build_local_plan, quadtree_image

PhaseKind = Literal["progressive", "cleanup"]
SIZE_ALIGN = 16  # phase sizes in pixels: whole 2 x 2 Flux tokens of an 8x VAE


@dataclass(frozen=True)
class Refinement:
    """The FFT low-pass refinement of a phase: a downscaled pass, bicubic up, frequency blend."""

    low: tuple[int, int]  # latent size of the downscaled pass
    sigmas: list[float]  # the K-step img2img tail it runs (never from sigma = 1 unless d = 1)
    seed: int
    local: LocalPlan
    factor: float
    blend: float


@dataclass(frozen=True)
class PhaseSpec:
    """One phase. Step indices are positions in `sigmas`, the phase's FULL schedule."""

    label: str  # "phase1", ..., or "cleanup": the artifact folder and the job.json key
    kind: PhaseKind
    index: int  # 0-based position in the plan
    size: PhaseSize  # pixels after the resize (the latent is size / vae factor)
    latent: tuple[int, int]
    resize: bool  # resize the previous result (or the source) to `size` first; False for clean-up
    seed: int
    denoise: float
    mu: float
    sigmas: list[float]
    local: LocalPlan
    global_plan: DilatedPlan | None
    renoise: float | None  # comfy_compat: upstream's pre-noise ratio before the sampler's own noising
    skip_weights: list[float] | None  # reference weight after each run step (flow_consistent)
    skip_blend: BlendKind  # how those mixes blend the trajectory and the reference
    stage_skip: float | None  # comfy_compat: the Upscaler's post-sampler lerp toward the input
    rewinds: list[tuple[int, int]]  # (start, run) ranges in run steps; the first is (0, run)
    refine: Refinement | None
    mask: torch.Tensor | None  # [1, 1, h, w] latent-size inpaint mask (1 = regenerate)

    @property
    def first_step(self) -> int:
        return self.local.first_step

    @property
    def run_steps(self) -> int:
        return len(self.sigmas) - 1 - self.first_step


@dataclass(frozen=True)
class UpscalePlan:
    source: tuple[int, int]
    target: tuple[int, int]
    phases: list[PhaseSpec]
    next_seed: int  # the Upscaler's next_seed output: for a job chained after this one

    def record(self) -> dict:
        progressive = [p for p in self.phases if p.kind == "progressive"]
        return {
            "source": list(self.source),
            "target": list(self.target),
            "sizes": [list(p.size) for p in progressive],
            "denoise": [p.denoise for p in progressive],
            "seeds": [p.seed for p in self.phases],
            "next_seed": self.next_seed,
        }


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of the model: its native latent side and the VAE's pixels per latent pixel."""

    native: int
    vae_factor: int


def plan_upscale(
    cfg: UpscaleConfig, source: torch.Tensor, mask: torch.Tensor | None, model: ModelShape
) -> UpscalePlan:
    """Every phase of the job for a source image [1, 3, H, W] (a multiple of the VAE factor) and an
    optional mask [1, 1, H, W]."""
    src = (int(source.shape[-2]), int(source.shape[-1]))
    target = (
        tuple(cfg.target) if cfg.target != (0, 0) else (round(src[0] * cfg.scale), round(src[1] * cfg.scale))
    )
    sizes = plan_phase_sizes(
        src, target, max_scale=cfg.max_scale, phases=cfg.phases or None, align=SIZE_ALIGN
    )
    planner = _Planner(cfg, source, mask, model, len(sizes))
    phases = [planner.progressive(i, size) for i, size in enumerate(sizes)]
    if cfg.cleanup.enabled:
        phases.append(planner.cleanup(sizes[-1]))
    return UpscalePlan(src, target, phases, next_seed(cfg.seed, len(sizes), cleanup=cfg.cleanup.enabled))


@dataclass(frozen=True)
class _Planner:
    cfg: UpscaleConfig
    source: torch.Tensor
    mask: torch.Tensor | None
    model: ModelShape
    count: int  # progressive phases

    def progressive(self, i: int, size: PhaseSize) -> PhaseSpec:
        cfg, skip = self.cfg, self.cfg.skip_residual
        seed, denoise = phase_seeds(cfg.seed, self.count)[i], cfg.phase_denoise(self.count)[i]
        latent, sigmas, mu, local = self._views(size, cfg.steps, denoise, seed, variable_denoise=True)
        run = len(sigmas) - 1 - local.first_step
        flow = cfg.noise_mode == "flow_consistent"
        return PhaseSpec(
            label=f"phase{i + 1}",
            kind="progressive",
            index=i,
            size=size,
            latent=latent,
            resize=True,
            seed=seed,
            denoise=denoise,
            mu=mu,
            sigmas=sigmas,
            local=local,
            global_plan=build_global_plan(
                cfg.coherence, height=latent[0], width=latent[1], native=self.model.native, rope=cfg.rope
            ),
            renoise=None if flow else linear_values(*cfg.renoise, self.count)[i],
            skip_weights=reference_weights(skip, run, i, self.count) if skip and flow and run > 0 else None,
            skip_blend=skip.blend if skip else "addition",
            stage_skip=phase_strengths(skip.phase_start, skip.phase_end, self.count)[i]
            if skip and not flow
            else None,
            rewinds=self._rewinds(run),
            refine=self._refinement(latent, seed) if run > 0 else None,
            mask=self._mask(latent),
        )

    def cleanup(self, size: PhaseSize) -> PhaseSpec:
        """The clean-up phase on the last phase's latent: every tile runs at cleanup.denoise."""
        cfg, c = self.cfg, self.cfg.cleanup
        seed = cleanup_seed(cfg.seed, self.count)
        latent, sigmas, mu, local = self._views(size, c.steps, c.denoise, seed, variable_denoise=False)
        flow = cfg.noise_mode == "flow_consistent"
        return PhaseSpec(
            label="cleanup",
            kind="cleanup",
            index=self.count,
            size=size,
            latent=latent,
            resize=False,
            seed=seed,
            denoise=c.denoise,
            mu=mu,
            sigmas=sigmas,
            local=local,
            global_plan=None,
            renoise=None if flow else linear_values(*cfg.renoise, self.count + 1)[self.count],
            skip_weights=None,
            skip_blend="addition",
            stage_skip=None,
            rewinds=self._rewinds(len(sigmas) - 1 - local.first_step),
            refine=None,
            mask=self._mask(latent),
        )

    def _views(
        self, size: PhaseSize, steps: int, denoise: float, seed: int, *, variable_denoise: bool
    ) -> tuple[tuple[int, int], list[float], float, LocalPlan]:
        """(latent size, full schedule, shift mu, local plan) of a phase at this pixel size.

        mu: Flux's resolution rule clamped at 1.15 unless set. A quadtree is built on the source at
        the phase's aligned pixel size, so its leaves cover every latent pixel whatever the target.
        """
        cfg, f = self.cfg, self.model.vae_factor
        latent = (size.height // f, size.width // f)
        mu = cfg.mu if cfg.mu is not None else mu_for_tokens(latent[0] * latent[1] // 4)
        sigmas = get_sigmas(steps, mu)
        image = quadtree_image(self.source, *size) if cfg.tiling.layout == "quadtree" else None
        local = build_local_plan(
            cfg.tiling,
            self._geometry(latent, sigmas, denoise, seed),
            image=image,
            variable_denoise=variable_denoise,
        )
        return latent, sigmas, mu, local

    def _geometry(self, latent: tuple[int, int], sigmas: list[float], denoise: float, seed: int) -> Geometry:
        m = self.model
        return Geometry(
            height=latent[0],
            width=latent[1],
            sigmas=sigmas,
            denoise=denoise,
            seed=seed,
            native_px=m.native * m.vae_factor,
            scale=m.vae_factor,
            rope=self.cfg.rope,
        )

    def _mask(self, latent: tuple[int, int]) -> torch.Tensor | None:
        return None if self.mask is None else resize_mask(self.mask, latent)

    def _rewinds(self, run: int) -> list[tuple[int, int]]:
        if run <= 0:
            return []
        return rewind_ranges(run, *self.cfg.rewind) if self.cfg.rewind[0] > 0 else [(0, run)]

    def _refinement(self, latent: tuple[int, int], seed: int) -> Refinement | None:
        """The refinement pass of a phase, or None where it changes nothing (b = 0, f <= 1, tiny latent)."""
        co = self.cfg.coherence
        if not refinement_applies(*latent, factor=co.fft_factor, blend=co.fft_blend):
            return None
        r = refinement_plan(
            *latent, factor=co.fft_factor, steps=self.cfg.steps, denoise=co.fft_denoise, align=2
        )
        sigmas = img2img_sigmas(
            get_sigmas(r.schedule_steps, mu_for_tokens(r.low[0] * r.low[1] // 4)), co.fft_denoise
        )
        # A quadtree has no image at the low size: the pass then runs MultiDiffusion grid tiles.
        tiling = (
            self.cfg.tiling if self.cfg.tiling.layout == "grid" else TilingConfig(method="multidiffusion")
        )
        local = build_local_plan(
            tiling, self._geometry(r.low, sigmas, 1.0, derive_seed(seed, "refine-tiles")), image=None
        )
        return Refinement(r.low, sigmas, derive_seed(seed, "refine"), local, co.fft_factor, co.fft_blend)
