"""Upscale quality on real photos: downsample x4 (bicubic), upscale back with each method, compare.

    python bench/upscale_quality.py                      # the eval photos, the reference model
    python bench/upscale_quality.py --limit 2 --steps 8  # a quick look

Methods: bicubic; single-phase tiled img2img (MultiDiffusion tiles, no skip, no global path); the
progressive method (2 phases, skip residual, dilated global views), the same plus the FFT low-pass
blend of a downscaled refinement pass; quadtree tiles (Mixture of Diffusers weights) with exact
per-tile denoise and skip residual. Per image and method: PSNR and SSIM (luminance) against
the original, LPIPS-Alex v0.1 against the original (Zhang et al. 2018; lower = closer), the
high-frequency energy ratio to the original (1 = as much fine detail), and the seam score on the
last phase's tile borders (gradient energy on borders / interior; 1 = invisible).
LPIPS needs torchvision's AlexNet checkpoint (runner/perceptual.py): from --lpips-backbone PATH
(then required: the run stops before any work if it is missing or its SHA-256 differs), else from
the torch hub cache; without it the column is null and the result says why ("lpips": {"measured":
false, "reason": ...}), never a number from random weights.
Originals are centre-cropped to multiples of 64 px so the x4 downsample lands on whole latent
tokens (recorded per image). Runs in process: quality does not depend on how views are fanned out.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, write_result  # noqa: E402
from core.eval.metrics import border_mask_from_boxes, high_frequency_ratio, psnr, seam_score, ssim  # noqa: E402
from core.models.loading import ModelSpec  # noqa: E402
from core.upscale.resize import resize_image  # noqa: E402
from core.upscale.skip_residual import SkipResidual  # noqa: E402
from runner.artifacts import read_image, write_png  # noqa: E402
from runner.context import JobArtifacts, JobContext, LocalModelPool  # noqa: E402
from runner.models import load_model  # noqa: E402
from runner.perceptual import LpipsColumn, LpipsUnavailableError, lpips_column  # noqa: E402
from tasks.upscale import run  # noqa: E402
from tasks.upscale_config import (  # noqa: E402
    CoherenceConfig,
    OutputsConfig,
    QuadtreeConfig,
    TilingConfig,
    UpscaleConfig,
)

METHODS = ("tiled_img2img", "progressive", "progressive_fft", "quadtree")
QUIET = OutputsConfig(phase_images=False, latent_stats=False, compare_bicubic=False, checkpoints=False)


def methods(model: ModelSpec, image: str, steps: int) -> dict[str, UpscaleConfig]:
    base = UpscaleConfig(model=model, image=image, scale=4.0, steps=steps, outputs=QUIET)
    skip = SkipResidual(phase_start=0.8, phase_end=0.5)  # the small model drifts: keep the reference strong
    progressive = dataclasses.replace(
        base,
        phases=2,
        denoise=(0.5, 0.35),
        skip_residual=skip,
        coherence=CoherenceConfig(dilated="auto"),
    )
    return {
        "tiled_img2img": dataclasses.replace(
            base, phases=1, denoise=(0.45,), skip_residual=None, coherence=CoherenceConfig(dilated=0)
        ),
        "progressive": progressive,
        "progressive_fft": dataclasses.replace(
            progressive,
            coherence=CoherenceConfig(dilated="auto", fft_blend=0.15, fft_factor=2.0, fft_denoise=0.3),
        ),
        "quadtree": dataclasses.replace(
            progressive,
            coherence=CoherenceConfig(dilated=0),
            tiling=TilingConfig(
                method="mixture",
                layout="quadtree",
                # Tiles run at these values as written. Before issue 10 the range acted as a ratio to
                # the phase denoise (0.3-0.8 ran 0.19-0.5, then 0.13-0.35): this is that band.
                quadtree=QuadtreeConfig(threshold=25.0, min_tile=64, denoise_min=0.15, denoise_max=0.45),
            ),
        ),
    }


def crop_to(image: torch.Tensor, multiple: int) -> torch.Tensor:
    h, w = image.shape[-2:]
    nh, nw = h // multiple * multiple, w // multiple * multiple
    top, left = (h - nh) // 2, (w - nw) // 2
    return image[..., top : top + nh, left : left + nw]


def score(
    result: torch.Tensor, original: torch.Tensor, boxes: list[list[int]], lpips: LpipsColumn
) -> dict[str, float | None]:
    h, w = original.shape[-2:]
    mask = border_mask_from_boxes(h, w, [tuple(b) for b in boxes], width_px=1) if boxes else None
    has_border = mask is not None and bool(mask.any()) and not bool(mask.all())
    distance = lpips.score(result, original)  # None when LPIPS is not measured
    return {
        "psnr": round(psnr(result, original), 3),
        "ssim": round(ssim(result, original), 4),
        "lpips": round(distance, 4) if distance is not None else None,
        "hf_ratio": round(high_frequency_ratio(result, original), 4),
        "seam": round(seam_score(result, mask), 4) if has_border else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    repo = Path(__file__).resolve().parents[1]
    p.add_argument("--images", default=str(repo.parent / "shared/assets/images/eval"))
    p.add_argument("--model", default="reference", choices=["reference", "tiny"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--name", default="upscale_quality")
    p.add_argument("--keep", default="", help="folder to keep the upscaled PNGs in")
    p.add_argument("--lpips-backbone", default=None, help="torchvision's alexnet-owt-7be5be79.pth (required)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:  # before any work: a named backbone that does not resolve stops the run
        lpips = lpips_column(args.lpips_backbone, required=args.lpips_backbone is not None)
    except LpipsUnavailableError as err:
        raise SystemExit(str(err)) from None
    print("lpips:", "measured" if lpips.measured else f"not measured ({lpips.weights.reason})", flush=True)
    spec = (
        ModelSpec(kind="reference") if args.model == "reference" else ModelSpec(kind="random", shape="tiny")
    )
    model = load_model(spec, "cpu")
    paths = sorted(Path(args.images).rglob("*.png"))[: args.limit or None]
    if not paths:
        raise SystemExit(f"no PNG images under {args.images}")
    work = Path(args.keep) if args.keep else Path("/tmp/tessera-quality")
    rows, started = [], time.perf_counter()
    for path in paths:
        original = crop_to(read_image(path), 64)
        h, w = original.shape[-2:]
        low = resize_image(original, (h // 4, w // 4), "bicubic")
        low_path = work / f"{path.stem}_low.png"
        write_png(low_path, low)
        row = {"image": str(path.relative_to(args.images)), "original": [h, w], "low": [h // 4, w // 4]}
        grid_boxes: list[list[int]] = []
        for name, cfg in methods(spec, str(low_path), args.steps).items():
            start = time.perf_counter()
            ctx = JobContext(
                JobArtifacts(work / path.stem / name, stream=open(os.devnull, "w")), LocalModelPool(model)
            )
            result = run(dataclasses.replace(cfg, target=(h, w), scale=0.0), ctx).image
            last = [k for k in ctx.artifacts.records if k.startswith("phase") and "/" not in k][-1]
            boxes = [[y * 8, x * 8, hh * 8, ww * 8] for y, x, hh, ww in ctx.artifacts.records[last]["tiles"]]
            grid_boxes = grid_boxes or (boxes if name == "progressive" else [])
            seconds = round(time.perf_counter() - start, 1)
            row[name] = {**score(result, original, boxes, lpips), "seconds": seconds}
            if args.keep:
                write_png(work / f"{path.stem}_{name}.png", result)
        bicubic = resize_image(low, (h, w), "bicubic")
        row["bicubic"] = score(bicubic, original, grid_boxes, lpips)
        rows.append(row)
        print(
            path.name,
            {m: row[m] for m in ("bicubic", *METHODS)},
            flush=True,
        )
    summary = {}
    for m in ("bicubic", *METHODS):
        vals = {
            k: [r[m][k] for r in rows if r[m].get(k) is not None]
            for k in ("psnr", "ssim", "lpips", "hf_ratio", "seam")
        }
        summary[m] = {k: round(sum(v) / len(v), 4) if v else None for k, v in vals.items()}
    result = {
        "bench": "upscale_quality",
        "env": environment(),
        "model": dataclasses.asdict(spec),
        "steps": args.steps,
        "methods": {k: dataclasses.asdict(v) for k, v in methods(spec, "<low>", args.steps).items()},
        "lpips": lpips.record(),
        "mean": summary,
        "images": rows,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    write_result(args.name, result)
    print(summary)


if __name__ == "__main__":
    main()
