"""Progressive tiled upscale (Flux-class flow matching): the job type behind `task: upscale`.

    plan = plan_upscale(cfg, source, mask)          every phase decided up front (upscale_phases)
    for phase in plan.phases:                       progressive phases, then the optional clean-up
        u = resize(previous result, phase.size)     pixel, latent or covariance-aware
        x = renoise(u, phase)                       noise ONCE to the start sigma (one eps per phase)
        x = sample(x, phase)                        Euler; tiles + dilated views per step, skip
                                                    residual, per-tile pinning and mask after it
        x = refine(x, phase)                        FFT low-pass blend of a downscaled pass
    image = decode(x)                               tiled VAE with exact GroupNorm statistics

The method, each decision and the trap it avoids are in docs/upscale.md. Phase seeds follow the
FlowMatching-Upscaler's golden-ratio stride; every other draw is keyed by derive_seed(phase seed,
purpose). The latent is checkpointed at each phase boundary (tasks/upscale_state.py); a re-run
with the same output folder and settings resumes after the last finished phase.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from core.eval.metrics import channel_stats, psnr, ssim
from core.eval.pictures import (
    LatentPreview,
    comparison,
    fit_latent_preview,
    latent_stats_chart,
    preview_rgb,
    preview_scale,
    to_uint8,
)
from core.flow.sampling import StepInfo, sample_euler
from core.flow.schedules import noise_to
from core.flow.seeds import derive_seed, gaussian_noise
from core.tiling.compose import compose_velocity
from core.tiling.quadtree import leaves_to_json, quadtree_overlay
from core.tiling.tile_plans import pin_to_reference
from core.tiling.tiles import Tile
from core.upscale.after_step import Reference, make_after_step
from core.upscale.fft_blend import fft_lowpass_blend
from core.upscale.phases import needs_final_resize
from core.upscale.resize import covariance_upscale, latent_method, resize_image, resize_latent
from core.upscale.skip_residual import stage_skip
from tasks.context import UpscaleContext
from tasks.upscale_config import UpscaleConfig
from tasks.upscale_phases import ModelShape, PhaseSpec, Refinement, plan_upscale
from tasks.upscale_plans import quadtree_image
from tasks.upscale_state import CHECKPOINT, resume


@dataclass
class PhaseResult:
    label: str
    latent: torch.Tensor  # the phase's result
    reference: torch.Tensor  # its resized input u: the trajectory is pinned to (1 - sigma) u + sigma eps
    tiles: list[Tile]
    views_per_step: list[int]


@dataclass
class UpscaleResult:
    image: torch.Tensor  # [1, 3, H, W] in [0, 1] at the target size
    phases: list[PhaseResult]


def run(cfg: UpscaleConfig, ctx: UpscaleContext) -> UpscaleResult:
    job = _Job(cfg, ctx)
    source, mask = job.read_inputs()
    plan = plan_upscale(cfg, source, mask, ModelShape(ctx.native_size, ctx.vae_scale_factor))
    state = resume(ctx, cfg, len(plan.phases))
    ctx.record("plan", {**plan.record(), "fingerprint": state.fingerprint})
    current = _Current(state.latent, source if state.latent is None else None)
    results = []
    for phase in plan.phases[state.next_phase :]:
        job.record_phase(phase, source)
        with ctx.timer("resize"):
            u = job.resize(phase, current)
        with ctx.timer("denoise"):
            x, reference = renoise(u, phase)
            x, views = job.sample(x, reference, phase)
            x = job.refine(x, phase)
        results.append(PhaseResult(phase.label, x, u, phase.local.tiles, views))
        state.finish_phase(phase.label, x, views)
        current = _Current(x, job.phase_artifacts(phase.label, x))
        if cfg.outputs.checkpoints:
            ctx.save_state(CHECKPOINT, state.state_dict())
    with ctx.timer("final_decode"):
        final = current.image if current.image is not None else job.decode(current.latent)
    final = job.save_outputs(final, source, plan.target)
    ctx.record("views_per_step", state.views_per_step)
    return UpscaleResult(final, results)


def renoise(u: torch.Tensor, phase: PhaseSpec) -> tuple[torch.Tensor, Reference]:
    """The phase's start state and its inversion trajectory z'_sigma = (1 - sigma) u + sigma eps.

    flow_consistent: x = z'_{sigma_0}, noised once. comfy_compat (phase.renoise set): upstream's
    (1 - n) u + n eps, then the sampler's own noising with the same eps, for comparison only.
    """
    eps = gaussian_noise(u.shape, phase.seed, dtype=u.dtype)
    reference = Reference(u, eps)
    if phase.run_steps <= 0:
        return u, reference
    sigma = phase.sigmas[phase.first_step]
    if phase.renoise is None:
        return reference.at(sigma), reference
    return noise_to(noise_to(u, eps, phase.renoise), eps, sigma), reference


def refine_blend(
    x: torch.Tensor, y_up: torch.Tensor, refine: Refinement, mask: torch.Tensor | None
) -> tuple[torch.Tensor, str]:
    """FFT low-pass blend of the refinement into x; outside the mask x stays as it is (on its reference)."""
    out, path = fft_lowpass_blend(x, y_up, factor=refine.factor, blend=refine.blend)
    return (out if mask is None else pin_to_reference(out, mask, x)), path


@dataclass
class _Current:
    """The latest result: its latent (None before the first phase) and its decoded image if known."""

    latent: torch.Tensor | None
    image: torch.Tensor | None


@dataclass
class _StepObserver:
    """Progress lines, metrics and previews of one sampling pass (the sampler's callback)."""

    ctx: UpscaleContext
    phase: PhaseSpec
    preview: LatentPreview | None
    views: list[int] = field(default_factory=list)

    def on_views(self, step: int, n: int) -> None:
        self.views.append(n)

    def __call__(self, info: StepInfo) -> None:
        p = self.phase
        self.ctx.progress(p.label, info.step + 1 - p.first_step, p.run_steps, count=sum(self.views))
        self.ctx.log_metrics(
            {"phase": p.index + 1, "sigma": info.sigma, "views": self.views[-1] if self.views else 0},
            step=info.step,
        )
        if self.preview is not None:
            picture = preview_rgb(info.x, self.preview, upscale=preview_scale(*info.x.shape[-2:]))
            self.ctx.save_image(f"{p.label}/previews/step_{info.step:03d}.png", picture)


class _Job:
    """The context-facing half of a job: VAE passes, resizes, sampling and artifacts of one config."""

    def __init__(self, cfg: UpscaleConfig, ctx: UpscaleContext) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.f = ctx.vae_scale_factor
        self.preview: LatentPreview | None = None  # fitted on the first phase run, when previews are on

    def read_inputs(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The source image and the mask's first channel, centre-cropped to a multiple of the VAE factor."""
        source = self.ctx.read_image(self.cfg.image)
        cropped = _crop_to(source, self.f)
        if cropped.shape != source.shape:
            before, after = tuple(source.shape[-2:]), tuple(cropped.shape[-2:])
            self.ctx.record_fallback(
                "input crop", f"{before} centre-cropped to a multiple of {self.f}: {after}"
            )
        mask = _crop_to(self.ctx.read_image(self.cfg.mask)[:, :1], self.f) if self.cfg.mask else None
        return cropped, mask

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return self.ctx.encode(image, tile=self.cfg.vae_tile_px(*image.shape[-2:]))

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        h, w = latent.shape[-2] * self.f, latent.shape[-1] * self.f
        return self.ctx.decode(latent, tile=self.cfg.vae_tile_px(h, w))

    def record_phase(self, phase: PhaseSpec, source: torch.Tensor) -> None:
        local = phase.local
        self.ctx.record(
            phase.label,
            {
                "kind": phase.kind,
                "latent": list(phase.latent),
                "denoise": phase.denoise,
                "seed": phase.seed,
                "mu": phase.mu,
                "sigmas": phase.sigmas[phase.first_step :],
                "first_step": phase.first_step,
                "tiles": [t.rect.as_list() for t in local.tiles],
                "tile_denoise": local.tile_denoise,
                "dilated_factor": phase.global_plan.factor if phase.global_plan is not None else 1,
                "noise_mode": self.cfg.noise_mode,
                "rewinds": phase.rewinds,
            },
        )
        if local.leaves:
            self.ctx.save_json(f"{phase.label}/quadtree.json", leaves_to_json(local.leaves))
            image = quadtree_image(source, *phase.size)[0].float()  # the image the tree was built on
            self.ctx.save_image(f"{phase.label}/quadtree_overlay.png", quadtree_overlay(image, local.leaves))

    def resize(self, phase: PhaseSpec, current: _Current) -> torch.Tensor:
        """The phase's input u: the previous result (or the source) resized to the phase's size."""
        if not phase.resize:
            return current.latent
        cfg, size = self.cfg, tuple(phase.size)
        if cfg.resize == "pixel":
            image = current.image if current.image is not None else self.decode(current.latent)
            image = resize_image(image, size, cfg.resize_method)
            u = self.encode(image)
        else:
            latent = current.latent if current.latent is not None else self.encode(current.image)
            u = self._resize_latent(phase, latent)
            image = None
        if self.cfg.outputs.previews and self.preview is None:
            self.preview = fit_latent_preview(u, image if image is not None else self.decode(u))
        return u

    def _resize_latent(self, phase: PhaseSpec, latent: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if cfg.resize == "covariance":
            cov = cfg.covariance
            u = covariance_upscale(
                latent, phase.latent, method=cfg.resize_method, moment_match=cov.moment_match,
                shrinkage=cov.shrinkage, sample_pixels=cov.sample_pixels,
                seed=derive_seed(phase.seed, "covariance"),
            )  # fmt: skip
        else:
            u, _ = resize_latent(latent, phase.latent, cfg.resize_method)
        used = latent_method(cfg.resize_method, latent.shape[1])
        if used != cfg.resize_method:
            self.ctx.record_fallback(
                f"{phase.label} latent resize",
                f"{cfg.resize_method} -> {used} for {latent.shape[1]} channels",
            )
        return u

    def sample(
        self, x: torch.Tensor, reference: Reference, phase: PhaseSpec
    ) -> tuple[torch.Tensor, list[int]]:
        """Euler over the phase's schedule tail, once per rewind range (Iterative Mixer's rewind:
        re-invert the current result with fresh noise and sample the tail again)."""
        if phase.run_steps <= 0:
            return x, []
        u, observer = reference.u, _StepObserver(self.ctx, phase, self.preview)
        model_fn = compose_velocity(
            phase.local.plan_for(u),
            self.ctx.evaluate,
            global_plan=phase.global_plan,
            on_views=observer.on_views,
        )
        self.ctx.progress(phase.label, 0, phase.run_steps, count=0)
        for r, (start, _) in enumerate(phase.rewinds):
            if r > 0:
                eps = gaussian_noise(x.shape, derive_seed(phase.seed, "rewind", r), dtype=x.dtype)
                reference = Reference(x, eps)
                x = reference.at(phase.sigmas[phase.first_step + start])
            after = make_after_step(
                phase.sigmas, reference, first_step=phase.first_step, skip_weights=phase.skip_weights,
                blend=phase.skip_blend,
                activity=phase.local.activity, mask=phase.mask,
            )  # fmt: skip
            first = phase.first_step + start
            x = sample_euler(
                model_fn, x, phase.sigmas[first:], after_step=after, callback=observer, first_step=first
            )
        if phase.stage_skip is not None:  # the Upscaler's post-sampler lerp toward u [comfy_compat]
            x = stage_skip(x, u, phase.stage_skip)
        return x, observer.views

    def refine(self, x: torch.Tensor, phase: PhaseSpec) -> torch.Tensor:
        """The Upscaler's refinement: area down, re-noise to strength d, K steps, bicubic up, blend."""
        r = phase.refine
        if r is None:
            return x
        x_lo, _ = resize_latent(x, r.low, "area")
        start = noise_to(x_lo, gaussian_noise(x_lo.shape, r.seed, dtype=x.dtype), r.sigmas[0])
        y_lo = sample_euler(compose_velocity(r.local.plan, self.ctx.evaluate), start, r.sigmas)
        y_up, _ = resize_latent(y_lo, tuple(x.shape[-2:]), "bicubic")
        out, path = refine_blend(x, y_up, r, phase.mask)
        self.ctx.record(
            f"{phase.label}/refinement",
            {"low": list(r.low), "steps": len(r.sigmas) - 1, "sigmas": r.sigmas, "blend_path": path},
        )
        return out

    def phase_artifacts(self, label: str, latent: torch.Tensor) -> torch.Tensor | None:
        """Latent statistics and the decoded result of a phase, as configured; the image if decoded."""
        outputs, ctx = self.cfg.outputs, self.ctx
        if outputs.latent_stats:
            stats = channel_stats(latent)
            ctx.save_json(f"{label}/latent_stats.json", stats)
            chart = latent_stats_chart(stats["mean"], stats["std"], title=f"{label}: per-channel mean +- std")
            ctx.save_image(f"{label}/latent_stats.png", chart)
        if not outputs.phase_images:
            return None
        image = self.decode(latent)
        ctx.save_image(f"{label}/result.png", image)
        return image

    def save_outputs(
        self, final: torch.Tensor, source: torch.Tensor, target: tuple[int, int]
    ) -> torch.Tensor:
        """result.png at the exact target (and the comparison with bicubic); returns the final image."""
        ctx = self.ctx
        if needs_final_resize(target, tuple(final.shape[-2:])):
            ctx.record_fallback(
                "final resize", f"{tuple(final.shape[-2:])} -> {target} (lanczos) to hit the exact target"
            )
            final = resize_image(final, target, "lanczos")
        ctx.save_image("result.png", final)
        if self.cfg.outputs.compare_bicubic:
            bicubic = resize_image(source, target, "bicubic")
            ctx.save_image("bicubic.png", bicubic)
            ctx.save_image("comparison.png", self.comparison(bicubic, final))
        return final

    def comparison(self, bicubic: torch.Tensor, final: torch.Tensor):
        """bicubic | Tessera (| reference) with 1:1 crops of the most detailed window; with
        outputs.reference, PSNR and SSIM of both against it, in the labels and in job.json."""
        images, names = [bicubic, final], ["bicubic", "Tessera"]
        path = self.cfg.outputs.reference
        if not path:
            return comparison([to_uint8(im) for im in images], names)
        reference = self.ctx.read_image(path)
        size = tuple(final.shape[-2:])
        if tuple(reference.shape[-2:]) != size:
            self.ctx.record_fallback(
                "reference resize", f"outputs.reference {tuple(reference.shape[-2:])} -> {size} (area)"
            )
            reference = resize_image(reference, size, "area")
        scores = {
            n: {"psnr_db": psnr(im, reference), "ssim": ssim(im, reference)}
            for n, im in zip(names, images, strict=True)
        }
        self.ctx.record("comparison", scores)
        labels = [f"{n}: PSNR {s['psnr_db']:.2f} dB, SSIM {s['ssim']:.3f}" for n, s in scores.items()]
        return comparison([to_uint8(im) for im in [*images, reference]], [*labels, "reference"])


def _crop_to(image: torch.Tensor, multiple: int) -> torch.Tensor:
    h, w = image.shape[-2:]
    nh, nw = h // multiple * multiple, w // multiple * multiple
    top, left = (h - nh) // 2, (w - nw) // 2
    return image[..., top : top + nh, left : left + nw]
