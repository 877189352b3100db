"""Where one served student forward's time goes on the GPU: its pieces timed apart, the host's
launch time, and the profiler's table.

The per-layer bench (attention_bench.py) times the whole forward and its big kernels; their sum
falls short of the whole by a few ms at every size. This names the rest: the gate probes' branches
(their PyTorch code: the window gather of 64 probe queries, their landmark and kernel readouts),
the conditioner and the reference disagreements, and the host's time to queue the forward (which
bounds it when the kernels are small).

    python bench/student_profile.py [--sizes 1024,4096] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.attention_bench import HEAD_DIM, HEADS, TEXT_TOKENS, cuda_times, layer_inputs  # noqa: E402
from core.attention.config import StudentConfig  # noqa: E402
from core.attention.geometry import TokenGeometry, index_to  # noqa: E402
from core.attention.kernel import KernelState  # noqa: E402
from core.attention.kernels.fused_student import dot_dtype  # noqa: E402
from core.attention.kernels.kernel_branch import accumulate_state, feature_weights  # noqa: E402
from core.attention.local import local_attention_at  # noqa: E402
from core.attention.student import build_student, gate_probes  # noqa: E402


def host_ms(fn, reps: int = 10) -> float:
    """Median host time to queue fn (the device is drained before each call, not after)."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize()
    return sorted(times)[len(times) // 2]


def profile(px: int, config: StudentConfig) -> dict:
    side = px // 16
    geometry = TokenGeometry(TEXT_TOKENS, side, side)
    q, k, v = layer_inputs(geometry.n, px)
    student = build_student(config, seed=px).cuda()
    sigma, cfg = torch.full((1,), 0.5, device="cuda"), torch.full((1,), 3.5, device="cuda")
    probes = gate_probes(geometry)
    b, h = q.shape[:2]
    with torch.inference_mode():
        state = accumulate_state(k, v, feature_weights(student.phi_k, dot_dtype(q, False)))
        kv_state = KernelState(state[0].reshape(b, h, *state[0].shape[1:]), state[1].reshape(b, h, -1))
        kp = k[:, :, index_to(probes, k.device)].float()

        def forward():
            return student(q, k, v, geometry, sigma, cfg)

        pieces = {
            "forward": cuda_times(forward, 10),
            "probe_branches": cuda_times(lambda: student.branches(kp, k, v, geometry, probes, kv_state), 10),
            "probe_local": cuda_times(
                lambda: local_attention_at(
                    kp, k, v, geometry, probes, tile=config.local_tile, radius=config.local_radius
                ),
                10,
            ),
            "conditioner": cuda_times(lambda: student.conditioner(sigma, cfg), 10),
        }
        host = {"forward": host_ms(forward), "probe_branches": host_ms(
            lambda: student.branches(kp, k, v, geometry, probes, kv_state))}  # fmt: skip
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            forward()
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    return {
        "px": px,
        "tokens": geometry.n,
        "cuda_ms": {n: t["median_ms"] for n, t in pieces.items()},
        "host_queue_ms": host,
        "profiler_table": table,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1024,4096")
    parser.add_argument("--out", type=Path, default=Path("bench/results/student_profile.json"))
    args = parser.parse_args()
    config = StudentConfig(heads=HEADS, head_dim=HEAD_DIM)
    rows = []
    for px in (int(s) for s in args.sizes.split(",")):
        row = profile(px, config)
        print(f"{px} px: cuda {row['cuda_ms']} host {row['host_queue_ms']}", flush=True)
        print(row["profiler_table"], flush=True)
        rows.append(row)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"config": config.__dict__, "sizes": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
