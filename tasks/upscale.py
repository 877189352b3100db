"""Progressive tiled upscale (Flux-class flow matching): the job type behind `task: upscale`.

Per phase (algorithms.md §4, §3, §6, §7): resize (pixel: decode, resize, encode; latent; or the
covariance-aware latent upscale), noise ONCE to the phase's start sigma with one seeded noise tensor
(flow_consistent; comfy_compat reproduces the upstream double noising for comparison), then Euler
steps whose model calls are the local views (tiles) plus the global dilated views of that step,
all fanned out over the pool in one call per step; after each step the skip residual mixes the
trajectory with the noise-inverted reference at the same sigma, exact per-tile denoise pins tiles
that have not started, and an inpaint mask keeps the outside on the reference. An optional FFT
low-pass blend with a downscaled refinement pass follows, then an optional clean-up phase, then
the (tiled, exact GroupNorm) decode.

Decisions: phase seeds follow the golden-ratio stride (Upscaler parity); every other draw is keyed
by derive_seed(phase seed, purpose). The schedule shift is Flux's resolution rule clamped at 1.15.
The latent is checkpointed at each phase boundary; a re-run with the same output folder resumes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import torch

from core.eval.metrics import channel_stats
from core.eval.pictures import bar_chart, fit_latent_preview, preview_rgb, side_by_side, to_uint8
from core.flow.sampling import StepInfo, sample_euler
from core.flow.schedules import get_sigmas, img2img_schedule_steps, img2img_sigmas, mu_for_tokens, noise_to
from core.flow.seeds import derive_seed, gaussian_noise
from core.tiling.compose import compose_velocity
from core.tiling.quadtree import leaves_to_json, quadtree_overlay
from core.tiling.tile_plans import pin_to_reference
from core.tiling.tiles import Tile
from core.tiling.views import FullFramePlan
from core.upscale.after_step import Reference, make_after_step
from core.upscale.fft_blend import fft_lowpass_blend, refinement_applies, refinement_plan
from core.upscale.phases import cleanup_seed, needs_final_resize, phase_seeds, plan_phase_sizes
from core.upscale.resize import covariance_upscale, resize_image, resize_latent, resize_mask
from core.upscale.skip_residual import (
    linear_values,
    phase_strengths,
    reference_weights,
    rewind_ranges,
    stage_skip,
)
from tasks.context import UpscaleContext
from tasks.upscale_config import UpscaleConfig
from tasks.upscale_plans import build_global_plan, build_local_plan, quadtree_image

CHECKPOINT = "checkpoints/phase.safetensors"


@dataclass
class PhaseResult:
    latent: torch.Tensor
    tiles: list[Tile]
    views_per_step: list[int]


@dataclass
class UpscaleResult:
    image: torch.Tensor  # [1, 3, H, W] in [0, 1] at the target size
    phases: list[PhaseResult]


def _crop_to(image: torch.Tensor, multiple: int) -> torch.Tensor:
    h, w = image.shape[-2:]
    nh, nw = h // multiple * multiple, w // multiple * multiple
    top, left = (h - nh) // 2, (w - nw) // 2
    return image[..., top : top + nh, left : left + nw]


def _fingerprint(cfg: UpscaleConfig) -> str:
    return hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Upscaler:
    """The state of one upscale job: config, context, the source image and the preview fit."""

    def __init__(self, cfg: UpscaleConfig, ctx: UpscaleContext) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.f = ctx.vae_scale_factor
        self.native = ctx.native_size
        self.preview = None

    def vae_tile(self, height: int, width: int) -> int:
        """Tile side in pixels for a VAE pass over an image of this size (0 = one untiled pass)."""
        mode, tile = self.cfg.vae_tiling, self.cfg.vae_tile
        return tile if mode == "on" or (mode == "auto" and max(height, width) > tile) else 0

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return self.ctx.encode(image, tile=self.vae_tile(*image.shape[-2:]))

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.ctx.decode(
            latent, tile=self.vae_tile(latent.shape[-2] * self.f, latent.shape[-1] * self.f)
        )

    # -- one phase -------------------------------------------------------------------------------
    def phase(
        self,
        label: str,
        index: int,
        phases: int,
        *,
        u: torch.Tensor,
        image: torch.Tensor | None,
        denoise: float,
        steps: int,
        seed: int,
        mask: torch.Tensor | None,
        cleanup: bool,
    ) -> PhaseResult:
        cfg, ctx = self.cfg, self.ctx
        lat_h, lat_w = u.shape[-2:]
        mu = cfg.mu if cfg.mu is not None else mu_for_tokens(lat_h * lat_w // 4)
        sigmas = get_sigmas(steps, mu)
        eps = gaussian_noise(u.shape, seed, dtype=u.dtype)
        ref = Reference(u, eps)
        local = build_local_plan(
            cfg.tiling,
            height=lat_h,
            width=lat_w,
            native_px=self.native * self.f,
            scale=self.f,
            steps=steps,
            denoise=denoise,
            seed=seed,
            rope=cfg.rope,
            image=image,
            reference=u,
            sigmas=sigmas,
        )
        global_plan = (
            None
            if cleanup
            else build_global_plan(
                cfg.coherence, height=lat_h, width=lat_w, native=self.native, rope=cfg.rope
            )
        )
        first = local.first_step
        run = steps - first
        ctx.record(
            f"{label}",
            {
                "latent": [lat_h, lat_w],
                "denoise": denoise,
                "seed": seed,
                "mu": mu,
                "sigmas": sigmas[first:],
                "first_step": first,
                "tiles": [[t.y0, t.x0, t.h, t.w] for t in local.tiles],
                "tile_denoise": local.tile_denoise,
                "dilated_factor": getattr(global_plan, "factor", 1),
                "noise_mode": cfg.noise_mode,
            },
        )
        if local.leaves:
            ctx.save_json(f"{label}/quadtree.json", leaves_to_json(local.leaves))
            if image is not None:
                ctx.save_image(
                    f"{label}/quadtree_overlay.png", quadtree_overlay(image[0].float(), local.leaves)
                )
        if run <= 0:
            return PhaseResult(u, local.tiles, [])

        # Noise once to the start sigma (flow_consistent) or twice as upstream (comfy_compat, §13a).
        if cfg.noise_mode == "flow_consistent":
            x = ref.at(sigmas[first])
        else:
            renoise = linear_values(*cfg.renoise, phases)[index]
            x = noise_to(noise_to(u, eps, renoise), eps, sigmas[first])
        skip_on = cfg.skip and not cleanup and cfg.noise_mode == "flow_consistent"
        views_per_step: list[int] = []
        done_views = [0]

        def on_views(step: int, n: int) -> None:
            views_per_step.append(n)
            done_views[0] += n

        def callback(info: StepInfo) -> None:
            ctx.progress(label, info.step + 1 - first, run, count=done_views[0])
            ctx.log_metrics(
                {
                    "phase": index + 1,
                    "sigma": info.sigma,
                    "views": views_per_step[-1] if views_per_step else 0,
                },
                step=info.step,
            )
            if cfg.outputs.previews and self.preview is not None:
                ctx.save_image(
                    f"{label}/previews/step_{info.step:03d}.png", preview_rgb(info.x, self.preview, upscale=2)
                )

        model_fn = compose_velocity(
            local.plan,
            ctx.evaluate,
            global_plan=global_plan,
            cosine_scale_2=cfg.coherence.cosine_scale_2,
            on_views=on_views,
        )
        ranges = rewind_ranges(run, *cfg.rewind) if cfg.rewind[0] > 0 else [(0, run)]
        ctx.progress(label, 0, run, count=0)
        for r, (start, _) in enumerate(ranges):
            if r > 0:  # rewind (§5.5): re-invert the current output and sample the tail again
                ref = Reference(x, gaussian_noise(u.shape, derive_seed(seed, "rewind", r), dtype=u.dtype))
                x = ref.at(sigmas[first + start])
            weights = reference_weights(cfg.skip_residual, run, index, phases) if skip_on else None
            after = make_after_step(
                sigmas,
                ref,
                first_step=first,
                skip_weights=weights,
                blend=cfg.skip_residual.blend,
                activity=local.activity,
                mask=mask,
            )
            x = sample_euler(
                model_fn,
                x,
                sigmas[first + start :],
                after_step=after,
                callback=callback,
                first_step=first + start,
            )

        if cfg.skip and not cleanup and cfg.noise_mode == "comfy_compat":
            strength = phase_strengths(cfg.skip_residual.phase_start, cfg.skip_residual.phase_end, phases)[
                index
            ]
            x = stage_skip(x, u, strength)  # the Upscaler's post-sampler lerp (§4.2 step 4) [parity]
        if not cleanup and refinement_applies(
            lat_h, lat_w, factor=cfg.coherence.fft_factor, blend=cfg.coherence.fft_blend
        ):
            refined = self.refine(label, x, seed=seed, steps=steps)
            # Outside the mask x is already on the reference (pinned every step): keep it there.
            x = refined if mask is None else pin_to_reference(refined, mask, x)
        return PhaseResult(x, local.tiles, views_per_step)

    def refine(self, label: str, x: torch.Tensor, *, seed: int, steps: int) -> torch.Tensor:
        """The Upscaler's dilated refinement (§4.3): a downscaled pass, bicubic up, FFT low-pass blend."""
        co, ctx = self.cfg.coherence, self.ctx
        lat_h, lat_w = x.shape[-2:]
        low_h, low_w, low_steps = refinement_plan(
            lat_h,
            lat_w,
            factor=co.fft_factor,
            steps=steps,
            min_steps=co.fft_min_steps,
            denoise=co.fft_denoise,
        )
        total = img2img_schedule_steps(low_steps, co.fft_denoise)
        low_h, low_w = max(2, low_h // 2 * 2), max(2, low_w // 2 * 2)  # whole 2x2 tokens
        x_lo, _ = resize_latent(x, (low_h, low_w), "area")
        eps_seed = derive_seed(seed, "refine") if co.fft_seed_mode == "derive" else seed
        eps = gaussian_noise(x_lo.shape, eps_seed, dtype=x.dtype)
        sigmas = img2img_sigmas(get_sigmas(total, mu_for_tokens(low_h * low_w // 4)), co.fft_denoise)
        local = build_local_plan(
            self.cfg.tiling
            if self.cfg.tiling.layout == "grid"
            else type(self.cfg.tiling)(method="multidiffusion"),
            height=low_h,
            width=low_w,
            native_px=self.native * self.f,
            scale=self.f,
            steps=len(sigmas) - 1,
            denoise=1.0,
            seed=derive_seed(seed, "refine-tiles"),
            rope=self.cfg.rope,
            image=None,
            reference=x_lo,
            sigmas=sigmas,
        )
        plan = local.plan if local.activity is None else FullFramePlan(self.cfg.rope)
        y_lo = sample_euler(compose_velocity(plan, ctx.evaluate), noise_to(x_lo, eps, sigmas[0]), sigmas)
        y_up, _ = resize_latent(y_lo, (lat_h, lat_w), "bicubic")
        out, path = fft_lowpass_blend(x, y_up, factor=co.fft_factor, blend=co.fft_blend)
        ctx.record(
            f"{label}/refinement",
            {"low": [low_h, low_w], "steps": len(sigmas) - 1, "sigmas": sigmas, "blend_path": path},
        )
        return out

    # -- artifacts -------------------------------------------------------------------------------
    def phase_artifacts(self, label: str, latent: torch.Tensor) -> torch.Tensor | None:
        outputs, ctx = self.cfg.outputs, self.ctx
        if outputs.latent_stats:
            stats = channel_stats(latent)
            ctx.save_json(f"{label}/latent_stats.json", stats)
            ctx.save_image(
                f"{label}/latent_stats.png",
                bar_chart(stats["mean"], errors=stats["std"], title=f"{label}: per-channel mean +- std"),
            )
        if outputs.phase_images:
            image = self.decode(latent)
            ctx.save_image(f"{label}/result.png", image)
            return image
        return None


def run(cfg: UpscaleConfig, ctx: UpscaleContext) -> UpscaleResult:
    up = _Upscaler(cfg, ctx)
    f = up.f
    source = ctx.read_image(cfg.image)
    cropped = _crop_to(source, f)
    if cropped.shape != source.shape:
        ctx.record_fallback(
            "input crop",
            f"{tuple(source.shape[-2:])} centre-cropped to a multiple of {f}: {tuple(cropped.shape[-2:])}",
        )
    source = cropped
    src_hw = tuple(source.shape[-2:])
    target = (
        tuple(cfg.target)
        if cfg.target != (0, 0)
        else (round(src_hw[0] * cfg.scale), round(src_hw[1] * cfg.scale))
    )
    sizes = plan_phase_sizes(src_hw, target, max_scale=cfg.max_scale, phases=cfg.phases or None, align=16)
    phases = len(sizes)
    denoises = cfg.phase_denoise(phases)
    seeds = phase_seeds(cfg.seed, phases)
    ctx.record(
        "plan",
        {
            "source": list(src_hw),
            "target": list(target),
            "sizes": [list(s) for s in sizes],
            "denoise": denoises,
            "seeds": seeds,
            "fingerprint": _fingerprint(cfg),
        },
    )
    mask_img = ctx.read_image(cfg.mask)[:, :1] if cfg.mask else None
    if mask_img is not None:
        mask_img = _crop_to(mask_img, f)

    # Resume from the last phase boundary of an identical config.
    start_phase, latent = 0, None
    saved = ctx.load_tensors(CHECKPOINT)
    fingerprint = torch.tensor(list(_fingerprint(cfg).encode()), dtype=torch.uint8)
    if saved is not None and torch.equal(saved["fingerprint"], fingerprint):
        start_phase, latent = int(saved["phase"].item()) + 1, saved["latent"]
        ctx.record("resumed_from_phase", start_phase)

    decoded = None  # the decoded image of `latent`, once something decoded it
    results: list[PhaseResult] = []
    for i in range(start_phase, phases):
        label = f"phase{i + 1}"
        size = sizes[i]
        lat_size = (size.height // f, size.width // f)
        with ctx.timer("resize"):
            if cfg.resize == "pixel":
                current = source if latent is None else decoded if decoded is not None else up.decode(latent)
                u_img = resize_image(current, tuple(size), cfg.resize_method)
                u = up.encode(u_img)
            else:
                latent = up.encode(source) if latent is None else latent
                u_img = None
                if cfg.resize == "latent":
                    u, used = resize_latent(latent, lat_size, cfg.resize_method)
                    if used != cfg.resize_method:
                        ctx.record_fallback(
                            f"{label} latent resize",
                            f"{cfg.resize_method} -> {used} for {latent.shape[1]} channels",
                        )
                else:
                    cov = cfg.covariance
                    u = covariance_upscale(
                        latent,
                        lat_size,
                        method=cfg.resize_method,
                        moment_match=cov.moment_match,
                        shrinkage=cov.shrinkage,
                        sample_pixels=cov.sample_pixels,
                        seed=derive_seed(seeds[i], "covariance"),
                    )
        if up.preview is None and (cfg.outputs.previews):
            fit_img = u_img if u_img is not None else up.decode(u)
            up.preview = fit_latent_preview(u, fit_img)
        q_img = quadtree_image(source, size.height, size.width) if cfg.tiling.layout == "quadtree" else None
        mask = resize_mask(mask_img, lat_size) if mask_img is not None else None
        with ctx.timer("denoise"):
            res = up.phase(
                label,
                i,
                phases,
                u=u,
                image=q_img,
                denoise=denoises[i],
                steps=cfg.steps,
                seed=seeds[i],
                mask=mask,
                cleanup=False,
            )
        results.append(res)
        latent = res.latent
        decoded = up.phase_artifacts(label, latent)
        if cfg.outputs.checkpoints:
            ctx.save_tensors(
                CHECKPOINT, {"latent": latent, "phase": torch.tensor([i]), "fingerprint": fingerprint}
            )

    if cfg.cleanup.enabled:
        u = latent
        # The quadtree of the latent actually cleaned (the last phase size, aligned up), not of the
        # exact target: leaves must cover every latent pixel.
        q_img = (
            quadtree_image(source, u.shape[-2] * f, u.shape[-1] * f)
            if cfg.tiling.layout == "quadtree"
            else None
        )
        with ctx.timer("denoise"):
            res = up.phase(
                "cleanup",
                phases,
                phases + 1,
                u=u,
                image=q_img,
                denoise=cfg.cleanup.denoise,
                steps=cfg.cleanup.steps,
                seed=cleanup_seed(cfg.seed, phases),
                mask=resize_mask(mask_img, tuple(u.shape[-2:])) if mask_img is not None else None,
                cleanup=True,
            )
        results.append(res)
        latent = res.latent
        decoded = up.phase_artifacts("cleanup", latent)

    with ctx.timer("final_decode"):
        final = decoded if decoded is not None else up.decode(latent)
    if needs_final_resize(target, tuple(final.shape[-2:])):
        ctx.record_fallback(
            "final resize", f"{tuple(final.shape[-2:])} -> {target} (lanczos) to hit the exact target"
        )
        final = resize_image(final, target, "lanczos")
    ctx.save_image("result.png", final)
    if cfg.outputs.compare_bicubic:
        bicubic = resize_image(source, target, "bicubic")
        ctx.save_image("bicubic.png", bicubic)
        ctx.save_image(
            "comparison.png",
            side_by_side([to_uint8(bicubic), to_uint8(final)], labels=["bicubic", "Tessera"]),
        )
    ctx.record("views_per_step", {f"phase{i + 1}": r.views_per_step for i, r in enumerate(results)})
    return UpscaleResult(final, results)
