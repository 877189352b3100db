"""What a fixed CPU thread count costs the model: the demo's work (reference model, 256 px tiles in
batches of 4, a TAEF2 decode of a 512 px image) timed at 1 and at 2 torch threads, alternating in
one process so that a busy machine's load falls on both alike.

    python bench/model_threads.py --runs 5 --out bench/results/model_threads.json

Also says whether the two thread counts give the same numbers (they do not: CPU kernels split their
reductions by thread count), which is why workers run the model at runner.models.MODEL_CPU_THREADS.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.models.forward import forward_batch  # noqa: E402
from core.models.loading import ModelSpec  # noqa: E402
from runner.models import load_model  # noqa: E402


def timed(fn, threads: int) -> tuple[float, torch.Tensor]:
    torch.set_num_threads(threads)
    start = time.perf_counter()
    with torch.no_grad():
        out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    model = load_model(ModelSpec(kind="reference"), "cpu")
    cond = model.make_cond()
    g = torch.Generator().manual_seed(0)
    views = torch.randn(4, model.meta.latent_channels, 32, 32, generator=g)
    sigma = torch.full((4,), 0.6)
    latent = torch.randn(1, model.meta.latent_channels, 64, 64, generator=g)
    work = {
        "forward_4x256px": lambda: forward_batch(
            model.backbone, cond, views, sigma, None, device=torch.device("cpu")
        ),
        "vae_decode_512px": lambda: model.vae.decode(latent),
    }
    # the machine's load, before and after: on a shared host a second thread may find no free core
    result: dict = {"cpu_count": torch.get_num_threads(), "runs": args.runs, "load_before": os.getloadavg()}
    for name, fn in work.items():
        times: dict[int, list[float]] = {1: [], 2: []}
        outs = {}
        timed(fn, 1)  # warm-up
        for _ in range(args.runs):
            for threads in (1, 2):
                t, outs[threads] = timed(fn, threads)
                times[threads].append(t)
        m1, m2 = statistics.median(times[1]), statistics.median(times[2])
        result[name] = {
            "median_s_1_thread": round(m1, 4),
            "median_s_2_threads": round(m2, 4),
            "slowdown_at_1_thread": round(m1 / m2, 3),
            "max_abs_difference": float((outs[1] - outs[2]).abs().max()),
            "times": {str(k): [round(x, 4) for x in v] for k, v in times.items()},
        }
        print(name, result[name])
    result["load_after"] = os.getloadavg()
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
