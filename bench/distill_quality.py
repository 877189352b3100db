"""Quality of a distillation job's students on the reference model.

    python bench/distill_quality.py --job runs/distill-reference     # after clusters/distill_reference.yaml

1. Per layer, cosine similarity and NMSE of student vs teacher on held-out captures: teacher runs
   from seeds the job never used (real sampling, every layer captured at every step, every query),
   binned in three sigma bands (high >= 2/3 > mid >= 1/3 > low).
2. Generation at 1024 px (same seeds) with every servable layer routed vs the teacher: PSNR, SSIM,
   LPIPS-Alex (Zhang et al. 2018; runner/perceptual.py).
3. An upscale of an eval photo (x2) with the same layers routed vs the teacher: PSNR, SSIM, LPIPS.
4. PNGs: ready layers and per-layer loss over updates (from the job's metrics.jsonl), and the
   teacher/student image pairs.

LPIPS needs torchvision's AlexNet checkpoint: --lpips-backbone PATH (then required) or the torch hub
cache. Without it the column is null and the result says why (`"lpips": {"measured": false, "reason":
...}`); no number comes from random weights.

Goals (issue 15): ready-layer cosine >= 0.99; routed PSNR >= 30 dB with at least half the layers
routed. The JSON says what was reached. Runs in process at one torch thread per the job's workers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, environment, write_result  # noqa: E402
from core.attention.geometry import TokenGeometry  # noqa: E402
from core.attention.routes import CaptureRoute  # noqa: E402
from core.eval.metrics import psnr, ssim  # noqa: E402
from core.eval.pictures import grid, to_uint8  # noqa: E402
from core.flow.generation import generation_noise, generation_sigmas  # noqa: E402
from core.flow.sampling import sample_euler  # noqa: E402
from core.models.attention_hook import LayerSet, attach  # noqa: E402
from core.models.forward import forward_batch  # noqa: E402
from core.models.loading import ModelSpec  # noqa: E402
from runner.context import JobArtifacts, JobContext, LocalModelPool  # noqa: E402
from runner.distill.bundle import load_bundle  # noqa: E402
from runner.models import load_model  # noqa: E402
from runner.perceptual import LpipsColumn, LpipsUnavailableError, lpips_column  # noqa: E402
from tasks.distill_attention import AttentionConfig  # noqa: E402
from tasks.generate import run as generate  # noqa: E402
from tasks.generate_config import GenerateConfig  # noqa: E402
from tasks.upscale import run as upscale  # noqa: E402
from tasks.upscale_config import CoherenceConfig, OutputsConfig, TilingConfig, UpscaleConfig  # noqa: E402

REFERENCE = ModelSpec(kind="reference")
BANDS = (("high", 2 / 3, 1.01), ("mid", 1 / 3, 2 / 3), ("low", 0.0, 1 / 3))
HELD_OUT_SEEDS = (1001, 1002)
QUIET = OutputsConfig(phase_images=False, latent_stats=False, compare_bicubic=False, checkpoints=False)


def held_out_metrics(model, bundle, size: int, steps: int) -> dict:
    """Per layer and sigma band: mean cosine and NMSE of the student on fresh teacher calls."""
    backbone, cond = model.backbone, model.make_cond()
    students = {k: e.build("cpu") for k, e in bundle.layers.items()}
    sums: dict[str, dict[str, list[float]]] = {}

    def keep(record, out):
        student = students[record.layer]
        q, k, v = (x.permute(0, 2, 1, 3).float() for x in (record.q, record.k, record.v))
        cfg = torch.ones_like(record.sigma)
        with torch.no_grad():
            y = student(
                q, k, v, TokenGeometry(record.n_text, record.rows, record.cols), record.sigma, cfg
            ).out
        t = out.permute(0, 2, 1, 3).float()
        cos = torch.nn.functional.cosine_similarity(y, t, dim=-1).mean().item()
        nmse = ((y - t).square().mean() / t.square().mean()).item()
        s = float(record.sigma[0])
        band = next(name for name, lo, hi in BANDS if lo <= s < hi)
        sums.setdefault(record.layer, {}).setdefault(band, []).append((cos, nmse))

    h = w = size // model.vae.scale_factor
    with attach(backbone.transformer, CaptureRoute(keep), LayerSet.parse(",".join(students))):
        for seed in HELD_OUT_SEEDS:
            x = generation_noise(backbone.latent_channels, h, w, seed)

            def model_fn(x, sigma, step):
                return forward_batch(backbone, cond, x, torch.full((1,), sigma), None, step=step)

            sample_euler(model_fn, x, generation_sigmas(h, w, steps))
    out = {}
    for layer, bands in sums.items():
        out[layer] = {
            band: {
                "cosine": float(np.mean([c for c, _ in vals])),
                "nmse": float(np.mean([n for _, n in vals])),
                "calls": len(vals),
            }
            for band, vals in bands.items()
        }
    return out


def routed_pair(
    model, run_fn, cfg, students: str, layers: str, out: Path, name: str, lpips: LpipsColumn
) -> dict:
    teacher_pool = LocalModelPool(model)
    teacher = run_fn(
        cfg, JobContext(JobArtifacts(out / f"{name}_teacher", stream=open(os.devnull, "w")), teacher_pool)
    )
    pool = LocalModelPool(model)
    routed = pool.serve_students(AttentionConfig(students=students, layers=layers))
    student = run_fn(
        cfg, JobContext(JobArtifacts(out / f"{name}_student", stream=open(os.devnull, "w")), pool)
    )
    a, b = teacher.image, student.image
    pair = grid([to_uint8(a), to_uint8(b)], labels=["teacher", f"students ({len(routed)} layers)"])
    Image.fromarray(pair).save(RESULTS / f"distill_quality_{name}.png")
    record = pool.summary()["attention"]
    return {
        "psnr_db": psnr(b, a),
        "ssim": ssim(b, a),
        "lpips": lpips.score(b, a),  # None when LPIPS is not measured (the result's "lpips" says why)
        "routed": list(routed),
        "served_calls": record["served_calls"],
        "fallback_calls": record["fallback_calls"],
        "size": list(a.shape[-2:]),
    }


def line_chart(
    series: dict[str, list[tuple[float, float]]], title: str, path: Path, log_y: bool = False
) -> None:
    """A small line chart (PIL): one polyline per series, a legend, axis extents printed."""
    width, height, pad = 640, 360, 48
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    pts = [p for s in series.values() for p in s]
    if not pts:
        img.save(path)
        return

    def fy(y):
        return np.log10(max(y, 1e-12)) if log_y else y

    xs, ys = [p[0] for p in pts], [fy(p[1]) for p in pts]
    x0, x1, y0, y1 = min(xs), max(xs) or 1, min(ys), max(ys)
    y1 = y1 if y1 > y0 else y0 + 1
    x1 = x1 if x1 > x0 else x0 + 1
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    for i, (name, s) in enumerate(series.items()):
        xy = [
            (
                pad + (x - x0) / (x1 - x0) * (width - 2 * pad),
                height - pad - (fy(y) - y0) / (y1 - y0) * (height - 2 * pad),
            )
            for x, y in s
        ]
        if len(xy) > 1:
            draw.line(xy, fill=colours[i % len(colours)], width=2)
        draw.text((width - pad - 90, pad + 12 * i), name, fill=colours[i % len(colours)])
    draw.rectangle([pad, pad, width - pad, height - pad], outline="black")
    label = (lambda v: f"1e{v:.1f}") if log_y else (lambda v: f"{v:.3g}")
    draw.text((4, pad), label(y1), fill="black")
    draw.text((4, height - pad - 10), label(y0), fill="black")
    draw.text((pad, height - pad + 6), f"{x0:.0f}", fill="black")
    draw.text((width - pad - 30, height - pad + 6), f"{x1:.0f}", fill="black")
    draw.text((pad, 12), title, fill="black")
    img.save(path)


def training_curves(job: Path) -> dict:
    rows = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines() if line.strip()]
    layers = sorted({k.split("/")[0] for r in rows for k in r if k.endswith("/updates") and ":" in k})
    loss = {
        k: [
            (r[f"{k}/updates"], r[f"{k}/val_cosine_distance"])
            for r in rows
            if f"{k}/val_cosine_distance" in r
        ]
        for k in layers
    }
    ready = {"ready layers": [(r["run"], r["ready_layers"]) for r in rows if "ready_layers" in r]}
    line_chart(
        loss,
        "validation cosine distance vs updates (log10)",
        RESULTS / "distill_quality_losses.png",
        log_y=True,
    )
    line_chart(ready, "ready layers vs teacher run", RESULTS / "distill_quality_ready.png")
    return {"runs": len(rows), "final_ready_layers": rows[-1]["ready_layers"] if rows else 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", default="runs/distill-reference", help="the distillation job's output folder")
    ap.add_argument("--size", type=int, default=1024, help="generation size (px)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--capture-size", type=int, default=512, help="held-out teacher runs (px)")
    ap.add_argument(
        "--image",
        default=str(Path(__file__).resolve().parents[2] / "shared/assets/images/eval/set5/butterfly.png"),
    )
    ap.add_argument("--lpips-backbone", default=None, help="alexnet-owt-7be5be79.pth (then required)")
    args = ap.parse_args()
    try:
        lpips = lpips_column(args.lpips_backbone, required=args.lpips_backbone is not None)
    except LpipsUnavailableError as err:
        raise SystemExit(str(err)) from None
    print("lpips:", "measured" if lpips.measured else f"not measured ({lpips.weights.reason})", flush=True)
    torch.set_num_threads(1)
    job, start = Path(args.job), time.perf_counter()
    students = str(job / "students")
    bundle = load_bundle(students)
    servable = bundle.servable()
    model = load_model(REFERENCE, "cpu")
    out = Path(os.environ.get("TMPDIR", "/tmp")) / "distill_quality"
    held_out = held_out_metrics(model, bundle, args.capture_size, args.steps)
    gen_cfg = GenerateConfig(model=REFERENCE, size=(args.size, args.size), seeds=(7,), steps=args.steps)
    generation = routed_pair(model, generate, gen_cfg, students, "ready", out, "generate", lpips)
    up_cfg = UpscaleConfig(
        model=REFERENCE, image=args.image, scale=2.0, phases=1, steps=args.steps, denoise=(0.5,),
        skip_residual=None, coherence=CoherenceConfig(dilated=0),
        tiling=TilingConfig(method="multidiffusion"), outputs=QUIET,
    )  # fmt: skip
    upscaled = routed_pair(model, upscale, up_cfg, students, "ready", out, "upscale", lpips)
    curves = training_curves(job)
    ready_cos = [min(b["cosine"] for b in held_out[k].values()) for k in servable if k in held_out]
    result = {
        "environment": environment(),
        "job": str(job),
        "layers": len(bundle.layers),
        "servable_layers": list(servable),
        "held_out": {
            "seeds": list(HELD_OUT_SEEDS),
            "size": args.capture_size,
            "steps": args.steps,
            "layers": held_out,
        },
        "generation_1024": generation,
        "upscale": {**upscaled, "image": args.image, "scale": 2.0},
        "training": curves,
        "lpips": lpips.record(),
        "goals": {
            "ready_cosine_ge_0.99": bool(ready_cos) and min(ready_cos) >= 0.99,
            "worst_ready_cosine": min(ready_cos) if ready_cos else None,
            "routed_psnr_ge_30db_with_half_routed": generation["psnr_db"] >= 30
            and len(servable) * 2 >= len(bundle.layers),
        },
        "wall_s": round(time.perf_counter() - start, 1),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "environment"}, indent=2))
    write_result("distill_quality", result)


if __name__ == "__main__":
    main()
