"""Attention student vs SDPA, one layer, forward only, on this machine's CPU.

The reference model's attention shape (6 heads x 64) at 512, 1024 and 2048 px: TAEF2 (/8) and 2 x 2
packing give (px / 16)^2 image tokens, plus its 4 learned text tokens. The student has the default
StudentConfig (F = 128, landmarks clamp(0.08 n_img, 64, 512), 8 x 8-token tiles, radius 1).

Each function runs --repeats times after one warm-up, all functions round-robin, so a change in the
machine's load falls on every function alike. Two clocks: wall time, and this process's CPU time.
On a shared machine whose other users keep more threads runnable than there are cores, wall time
measures the scheduler as much as the code; CPU time at one thread (--threads 1) counts only the
cycles this computation took, which is the figure to compare there. The branch breakdown times
each branch function alone; "mix" is the student minus its three branches (conditioner, gates,
finiteness check). The machine's load average is recorded with each size.

    python bench/student_cpu.py [--sizes 512,1024,2048] [--repeats 5] [--threads N]

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
PARTS = ("sdpa", "student", "local", "kernel", "landmark")


def timed(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict[str, dict[str, float]]]:
    """{name: {"wall": stats, "cpu": stats}}, the functions run round-robin after one warm-up round."""
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            if round_:
                wall[name].append(time.perf_counter() - w0)
                cpu[name].append(time.process_time() - c0)
    return {name: {"wall": stats(wall[name]), "cpu": stats(cpu[name])} for name in fns}


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
    row: dict = {
        "px": px,
        "tokens": geometry.n,
        "image_tokens": geometry.n_img,
        "landmark_keys": int(index.numel()),
        "local_keys_per_tile": int(
            local_index(geometry, tile=config.local_tile, radius=config.local_radius).key.shape[1]
        ),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    for clock in ("wall", "cpu"):
        med = {part: timings[part][clock]["median_s"] for part in PARTS}
        row[clock] = {
            **{part: timings[part][clock] for part in PARTS},
            "mix_s": round(med["student"] - med["local"] - med["kernel"] - med["landmark"], 5),
            "speedup": round(med["sdpa"] / med["student"], 3),
        }
    return row


def print_table(rows: list[dict], clock: str) -> None:
    print(f"{clock} time, median ms")
    print(
        f"{'px':>5} {'tokens':>7} {'sdpa':>9} {'student':>9} {'speedup':>8} "
        f"{'local':>8} {'kernel':>8} {'landmark':>9} {'mix':>7} {'load':>5}"
    )
    for r in rows:
        c = r[clock]
        ms = {part: 1000 * c[part]["median_s"] for part in PARTS}
        print(
            f"{r['px']:>5} {r['tokens']:>7} {ms['sdpa']:>9.1f} {ms['student']:>9.1f} {c['speedup']:>8.2f} "
            f"{ms['local']:>8.1f} {ms['kernel']:>8.1f} {ms['landmark']:>9.1f} {1000 * c['mix_s']:>7.1f} "
            f"{r['load_average_1min'][0]:>5.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="512,1024,2048")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = StudentConfig(heads=HEADS, head_dim=HEAD_DIM)
    rows = [measure(int(px), args.repeats, config) for px in args.sizes.split(",")]
    print(f"one layer, {HEADS} heads x {HEAD_DIM}, batch 1, fp32, {torch.get_num_threads()} threads")
    for clock in ("cpu", "wall"):
        print_table(rows, clock)
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
