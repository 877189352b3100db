"""Attention student vs SDPA, one layer, forward only, on this machine's CPU.

The reference model's attention shape (6 heads x 64) at 512, 1024 and 2048 px: TAEF2 (/8) and 2 x 2
packing give (px / 16)^2 image tokens, plus its 4 learned text tokens. The student has the default
StudentConfig (F = 128, landmarks clamp(0.08 n_img, 64, 512), 8 x 8-token tiles, radius 1). Each
timing is the median of --repeats runs after one warm-up, all functions run round-robin; the branch
breakdown times each branch function alone, and "mix" is the student's total minus its three
branches (conditioner, gates, finiteness check). The machine's load average is recorded with each
size: on a shared machine it is what the figures must be read against.

    python bench/student_cpu.py [--sizes 512,1024,2048] [--repeats 5]

Results: bench/results/student_cpu.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, stats, write_result  # noqa: E402
from core.attention.config import StudentConfig  # noqa: E402
from core.attention.geometry import TokenGeometry  # noqa: E402
from core.attention.kernel import kernel_attention  # noqa: E402
from core.attention.landmarks import landmark_attention, landmark_count, landmark_indices  # noqa: E402
from core.attention.local import local_attention, local_index  # noqa: E402
from core.attention.student import build_student  # noqa: E402

HEADS, HEAD_DIM, TEXT_TOKENS = 6, 64, 4


def timed(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict[str, float]]:
    """Timing stats per function, run round-robin (one warm-up round first) so that a change in the
    machine's load during the run falls on every function alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: stats(t) for name, t in times.items()}


def measure(px: int, repeats: int, config: StudentConfig) -> dict:
    side = px // 16
    geometry = TokenGeometry(TEXT_TOKENS, side, side)
    g = torch.Generator().manual_seed(px)
    q, k, v = torch.randn(3, 1, HEADS, geometry.n, HEAD_DIM, generator=g).unbind(0)
    sigma, cfg = torch.tensor([0.5]), torch.tensor([1.0])
    student = build_student(config, seed=0).eval()
    m = landmark_count(
        geometry.n_img,
        fraction=config.landmark_fraction,
        minimum=config.landmark_min,
        maximum=config.landmark_max,
    )
    index = landmark_indices(geometry, m)
    window = local_index(geometry, tile=config.local_tile, radius=config.local_radius).key.shape[1]
    fns = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
        "student": lambda: student(q, k, v, geometry, sigma, cfg),
        "local": lambda: local_attention(
            q, k, v, geometry, tile=config.local_tile, radius=config.local_radius
        ),
        "kernel": lambda: kernel_attention(q, k, v, student.phi_q, student.phi_k),
        "landmark": lambda: landmark_attention(q, k, v, index),
    }
    load_before = os.getloadavg()[0]
    with torch.no_grad():
        timings = timed(fns, repeats)
    row = {
        "px": px,
        "tokens": geometry.n,
        "image_tokens": geometry.n_img,
        "landmark_keys": int(index.numel()),
        "local_keys_per_tile": int(window),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        **timings,
    }
    branches = sum(row[b]["median_s"] for b in ("local", "kernel", "landmark"))
    row["mix_s"] = round(row["student"]["median_s"] - branches, 5)
    row["speedup"] = round(row["sdpa"]["median_s"] / row["student"]["median_s"], 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="512,1024,2048")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config = StudentConfig(heads=HEADS, head_dim=HEAD_DIM)
    rows = [measure(int(px), args.repeats, config) for px in args.sizes.split(",")]
    header = f"{'px':>5} {'tokens':>7} {'sdpa ms':>9} {'student ms':>11} {'speedup':>8} "
    header += f"{'local':>8} {'kernel':>8} {'landmark':>9} {'mix':>7}"
    print(
        f"one layer, {HEADS} heads x {HEAD_DIM}, batch 1, fp32, {torch.get_num_threads()} threads, median ms"
    )
    print(header)
    for r in rows:
        ms = {b: 1000 * r[b]["median_s"] for b in ("sdpa", "student", "local", "kernel", "landmark")}
        print(
            f"{r['px']:>5} {r['tokens']:>7} {ms['sdpa']:>9.1f} {ms['student']:>11.1f} {r['speedup']:>8.2f} "
            f"{ms['local']:>8.1f} {ms['kernel']:>8.1f} {ms['landmark']:>9.1f} {1000 * r['mix_s']:>7.1f}"
        )
    write_result(
        "student_cpu",
        {
            "environment": environment(),
            "torch_threads": torch.get_num_threads(),
            "shape": {
                "heads": HEADS,
                "head_dim": HEAD_DIM,
                "text_tokens": TEXT_TOKENS,
                "batch": 1,
                "dtype": "fp32",
            },
            "student_config": config.__dict__,
            "repeats": args.repeats,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
