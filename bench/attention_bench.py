"""Attention student on the GPU kernels vs SDPA, one Flux.1-dev layer, and optionally a whole forward.

Per layer (24 heads x 128, 512 text tokens, bf16, batch 1) at 1024 / 2048 / 4096 px, i.e. 64^2 /
128^2 / 256^2 latent tokens after 8x VAE and 2x2 packing, 4,608 / 16,896 / 66,048 tokens: the
default StudentConfig (F = 128, phi d -> 256 -> 256 -> 128, 512 landmarks, 8 x 8 tiles, radius 1)
against `F.scaled_dot_product_attention` on the same q, k, v, laid out as the route hook hands them
over ([B, S, H, D] permuted to [B, H, S, D]).

- forward: SDPA vs the student's forward (core/attention/kernels/fused_student.py, what
  `Student.forward` runs on CUDA), with the branch breakdown: local and landmark branches (one Triton
  window kernel for the image queries, SDPA for the text queries), kernel branch (the KV/z
  accumulation with phi_k fused, the readout with phi_q fused), mix (two Triton passes). The PyTorch
  branches of `Student.branches` (the reference code, fp32) are timed too.
- --sweep PX: launch variants (block, warps, stages, chunk) of each kernel at PX first.
- forward + backward: SDPA with gradients to q, k, v (what training through full attention costs)
  vs the student with gradients to its parameters (what a distillation update costs: the inputs are
  captured activations).
- --e2e: one 4096 px full-frame forward of a Flux.1-dev-shaped FluxTransformer2DModel (random bf16
  weights, 19 double + 38 single blocks, guidance embedding) with SDPA, and with all 57 layers routed
  to students (core/models/attention_hook.attach + core/attention/routes.StudentRoute). Needs diffusers.

Times are CUDA-event medians after warm-up.

    python bench/attention_bench.py [--sizes 1024,2048,4096] [--e2e] [--out PATH]

Results: bench/results/attention_bench.json (the default --out).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.attention.config import StudentConfig  # noqa: E402
from core.attention.geometry import TokenGeometry  # noqa: E402
from core.attention.landmarks import landmark_count, landmark_indices  # noqa: E402
from core.attention.local import local_index  # noqa: E402
from core.attention.student import build_student  # noqa: E402

HEADS, HEAD_DIM, TEXT_TOKENS = 24, 128, 512
RESULT = Path(__file__).resolve().parent / "results" / "attention_bench.json"
REPS = {1024: 30, 2048: 20, 4096: 10}


def cuda_times(fn: Callable[[], object], reps: int, warmup: int = 3) -> dict[str, float]:
    """CUDA-event times of fn in ms: median, min, max over reps after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "reps": reps}


def layer_inputs(n: int, seed: int) -> tuple[torch.Tensor, ...]:
    """q, k, v [1, H, n, D] bf16 as the route hands them over (views of [1, n, H, D])."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(3, 1, n, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    return tuple(t.permute(0, 2, 1, 3) for t in x.unbind(0))


def landmark_budget(geometry: TokenGeometry, config: StudentConfig) -> int:
    return landmark_count(
        geometry.n_img,
        fraction=config.landmark_fraction,
        minimum=config.landmark_min,
        maximum=config.landmark_max,
    )


def flops(geometry: TokenGeometry, config: StudentConfig) -> dict[str, float]:
    """Matrix-product flops of each branch and of full attention (4 N_q N_k d per head)."""
    idx = local_index(geometry, tile=config.local_tile, radius=config.local_radius)
    inside = (idx.query < geometry.n).sum(1).double() * idx.key_valid.sum(1).double()
    hd = HEADS * HEAD_DIM
    d, f = HEAD_DIM, config.features
    hid = max(d, 2 * f)
    mlp = 2 * (d * hid + hid * hid + hid * f)  # per token and head
    n_landmarks = landmark_indices(geometry, landmark_budget(geometry, config)).numel()
    return {
        "sdpa": 4.0 * geometry.n**2 * hd,
        "local": 4.0 * hd * (float(inside.sum()) + geometry.n_text * geometry.n),
        "kernel": HEADS * geometry.n * 2 * (mlp + 2 * f * d),
        "landmark": 4.0 * hd * geometry.n * n_landmarks,
    }


def per_layer(px: int, config: StudentConfig, seed: int) -> dict:
    from core.attention.kernels.branches import window_branches
    from core.attention.kernels.fused_student import fused_branches
    from core.attention.kernels.kernel_branch import accumulate_state, feature_weights, read_out

    side = px // 16
    geometry = TokenGeometry(TEXT_TOKENS, side, side)
    reps = REPS.get(px, 10)
    q, k, v = layer_inputs(geometry.n, seed)
    student = build_student(config, seed=seed).cuda()
    sigma, cfg = torch.full((1,), 0.5, device="cuda"), torch.full((1,), 3.5, device="cuda")
    index = landmark_indices(geometry, landmark_budget(geometry, config)).cuda()
    r: dict = {
        "px": px,
        "tokens": geometry.n,
        "image_tokens": geometry.n_img,
        "landmarks": int(index.numel()),
    }
    fwd: dict = {}
    with torch.inference_mode():
        fwd["sdpa"] = cuda_times(lambda: F.scaled_dot_product_attention(q, k, v), reps)
        fwd["student"] = cuda_times(lambda: student(q, k, v, geometry, sigma, cfg), reps)
        wq, wk = (
            feature_weights(student.phi_q, torch.bfloat16),
            feature_weights(student.phi_k, torch.bfloat16),
        )
        kv, z = accumulate_state(k, v, wk)
        br = fused_branches(student, q, k, v, geometry, interpret=False)
        t = config.local_tile, config.local_radius
        fwd["local_and_landmark"] = cuda_times(
            lambda: window_branches(
                q, k, v, geometry, index, tile=t[0], radius=t[1], dot=torch.bfloat16, out_dtype=q.dtype
            ),
            reps,
        )
        fwd["kernel_state"] = cuda_times(lambda: accumulate_state(k, v, wk), reps)
        fwd["kernel_readout"] = cuda_times(lambda: read_out(q, kv, z, wq, eps=1e-6, out_dtype=q.dtype), reps)
        fwd["mix"] = time_mix(br, config, reps)
        del br
        fwd["pytorch_branches_fp32"] = cuda_times(
            lambda: student.branches(q.float(), k.float(), v.float(), geometry), max(2, reps // 5), warmup=1
        )
        out = student(q, k, v, geometry, sigma, cfg)
    r["forward"] = fwd
    r["forward_ratio_student_over_sdpa"] = fwd["student"]["median_ms"] / fwd["sdpa"]["median_ms"]
    r["student_nonfinite"] = list(out.nonfinite)
    r["flops"] = flops(geometry, config)
    r["tflops_per_s"] = {
        name: sum(r["flops"][part] for part in name.split("+")) / (fwd[key]["median_ms"] * 1e9)
        for name, key in (("sdpa", "sdpa"), ("local+landmark", "local_and_landmark"))
    }
    r["forward_backward"] = forward_backward(student, q, k, v, geometry, sigma, cfg, max(3, reps // 2))
    fb = r["forward_backward"]
    r["forward_backward_ratio_student_over_sdpa"] = fb["student"]["median_ms"] / fb["sdpa"]["median_ms"]
    return r


def time_mix(br, config: StudentConfig, reps: int) -> dict[str, float]:
    from core.attention.kernels.branches import mix

    mod = torch.zeros(1, 6, device="cuda")
    gates = torch.tensor([[-2.2] * HEADS, [2.0] * HEADS] * 2, device="cuda")  # logit(0.1), gamma 2
    reference = torch.full((HEADS, 2), 0.5, device="cuda")  # the probes' mean disagreements
    return cuda_times(
        lambda: mix(
            br.local, br.kernel, br.landmark, mod, gates, reference, n_text=TEXT_TOKENS,
            alpha_max=config.alpha_max, dtype=torch.bfloat16,
        ),
        reps,
    )  # fmt: skip


def forward_backward(student, q, k, v, geometry, sigma, cfg, reps: int) -> dict:
    qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))
    grad = torch.randn_like(q)

    def sdpa() -> None:
        F.scaled_dot_product_attention(qg, kg, vg).backward(grad)

    def stud() -> None:
        student(q, k, v, geometry, sigma, cfg).out.backward(grad)

    return {"sdpa": cuda_times(sdpa, reps), "student": cuda_times(stud, reps)}


def end_to_end(config: StudentConfig, px: int, reps: int) -> dict:
    """One full-frame forward at px with SDPA and with all layers routed to ready students."""
    from diffusers import FluxTransformer2DModel

    from core.attention.routes import StudentRoute
    from core.models.attention_hook import LayerSet, attach
    from core.models.backbone import Cond
    from core.models.build import build_random
    from core.models.flux import FLUX_DEV_CONFIG, FluxBackbone

    t0 = time.perf_counter()
    transformer = build_random(
        FluxTransformer2DModel, FLUX_DEV_CONFIG, dtype=torch.bfloat16, device="cuda", seed=0, std=0.02
    )
    backbone = FluxBackbone(transformer, native_size=128)
    build_s = time.perf_counter() - t0
    g = torch.Generator(device="cuda").manual_seed(1)
    latent = px // 8
    x = torch.randn(1, 16, latent, latent, device="cuda", dtype=torch.bfloat16, generator=g)
    cond = Cond(
        torch.randn(TEXT_TOKENS, 4096, device="cuda", generator=g),
        torch.randn(768, device="cuda", generator=g),
        guidance=3.5,
    )
    sigma = torch.full((1,), 0.5, device="cuda")
    keys = [f"double:{i}" for i in range(19)] + [f"single:{i}" for i in range(38)]
    students = {key: build_student(config, seed=i).cuda().requires_grad_(False) for i, key in enumerate(keys)}
    route = StudentRoute(students, ready=keys)
    with torch.inference_mode():
        sdpa = cuda_times(lambda: backbone.velocity(x, sigma, cond), reps, warmup=1)
        with attach(transformer, route, LayerSet.all()):
            routed = cuda_times(lambda: backbone.velocity(x, sigma, cond), reps, warmup=1)
    record = route.counters.as_record()
    return {
        "px": px,
        "tokens": TEXT_TOKENS + (latent // 2) ** 2,
        "build_s": build_s,
        "sdpa_forward": sdpa,
        "student_forward": routed,
        "speedup": sdpa["median_ms"] / routed["median_ms"],
        "route_counters_total": record.get("total", record),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


VARIANTS = {  # (block, warps, stages, chunk, tiles) of each kernel timed by --sweep
    # (64, 4, 1, 32) ran at 4096 px (3.50 ms) but hit an illegal address at 2048 px (first failure
    # under CUDA_LAUNCH_BLOCKING=1; cause not established, the defaults are clean under memcheck),
    # and every later launch of that process failed with it: left out.
    "kv": [
        (64, 4, 1, 64, 1), (128, 8, 1, 32, 1), (128, 8, 2, 32, 1),
        (128, 8, 1, 64, 1), (256, 16, 1, 32, 1), (256, 16, 2, 32, 1),
    ],
    "readout": [
        (128, 8, 2, 64, 1), (128, 8, 2, 32, 1), (128, 8, 3, 32, 1), (256, 16, 2, 32, 1),
        (256, 16, 2, 64, 1), (256, 16, 1, 32, 1),
    ],
    "window": [
        (64, 4, 3, 64, 1), (64, 4, 2, 64, 1), (64, 8, 3, 64, 1), (64, 8, 3, 64, 2), (64, 8, 2, 64, 2),
        (64, 4, 3, 64, 2), (128, 8, 3, 64, 2),
    ],
    "mix": [(32, 4, 1, 64, 1), (64, 4, 1, 64, 1), (128, 8, 1, 64, 1)],
}  # fmt: skip


def sweep(px: int, config: StudentConfig, reps: int = 5) -> list[dict]:
    """Launch-setting variants of each kernel at px: CUDA-event medians, or the compiler's refusal."""
    from core.attention.kernels.branches import mix, window_branches
    from core.attention.kernels.fused_student import fused_branches
    from core.attention.kernels.kernel_branch import accumulate_state, feature_weights, read_out
    from core.attention.kernels.launch import Launch

    side = px // 16
    geometry = TokenGeometry(TEXT_TOKENS, side, side)
    q, k, v = layer_inputs(geometry.n, seed=7)
    student = build_student(config, seed=7).cuda()
    wq, wk = feature_weights(student.phi_q, torch.bfloat16), feature_weights(student.phi_k, torch.bfloat16)
    mod = torch.zeros(1, 6, device="cuda")
    gates = torch.tensor([[-2.2] * HEADS, [2.0] * HEADS] * 2, device="cuda")
    reference = torch.full((HEADS, 2), 0.5, device="cuda")  # the probes' mean disagreements
    index = landmark_indices(geometry, landmark_budget(geometry, config)).cuda()
    t = config.local_tile, config.local_radius
    with torch.inference_mode():
        kv, z = accumulate_state(k, v, wk)
        br = fused_branches(student, q, k, v, geometry, interpret=False)
        kernels = {
            "kv": lambda L: accumulate_state(k, v, wk, launch=L),
            "readout": lambda L: read_out(q, kv, z, wq, eps=1e-6, out_dtype=q.dtype, launch=L),
            "window": lambda L: window_branches(
                q, k, v, geometry, index, tile=t[0], radius=t[1], dot=q.dtype, out_dtype=q.dtype, launch=L
            ),
            "mix": lambda L: mix(
                br.local,
                br.kernel,
                br.landmark,
                mod,
                gates,
                reference,
                n_text=TEXT_TOKENS,
                alpha_max=config.alpha_max,
                dtype=torch.bfloat16,
                launch=L,
            ),  # fmt: skip
        }
        rows = []
        for name, fn in kernels.items():
            for variant in VARIANTS[name]:
                launch = Launch(*variant)
                row = {"kernel": name, "px": px, **launch._asdict()}
                try:
                    row.update(cuda_times(lambda fn=fn, launch=launch: fn(launch), reps, warmup=1))
                except Exception as err:  # a variant the compiler refuses (resources): recorded, not hidden
                    row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
                rows.append(row)
                print(row, flush=True)
    return rows


def kernel_resources() -> list[dict]:
    """Registers, spills and shared memory of every compiled specialisation of the student's kernels
    (read from Triton's per-device kernel caches; None where this Triton version does not say)."""
    from core.attention.kernels import triton_feature_map, triton_mix, triton_window

    kernels = {
        "kv": triton_feature_map._kv_kernel,
        "readout": triton_feature_map._readout_kernel,
        "window": triton_window._window_kernel,
        "disagreement": triton_mix._disagreement_kernel,
        "mix": triton_mix._mix_kernel,
    }
    rows = []
    for name, fn in kernels.items():
        for cache in fn.device_caches.values():
            for compiled in cache[0].values():
                meta = getattr(compiled, "metadata", None)
                rows.append(
                    {
                        "kernel": name,
                        "warps": getattr(meta, "num_warps", None),
                        "stages": getattr(meta, "num_stages", None),
                        "registers": getattr(compiled, "n_regs", None),
                        "spills": getattr(compiled, "n_spills", None),
                        "shared_bytes": getattr(meta, "shared", None),
                    }
                )
    return rows


def environment() -> dict:
    import importlib.metadata as md

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "not installed"

    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": version("triton"),
        "diffusers": version("diffusers"),
        "gpu": torch.cuda.get_device_name(0),
    }


def summary(r: dict) -> str:
    f = {name: t["median_ms"] for name, t in r["forward"].items()}
    return (
        f"{r['px']} px, {r['tokens']} tokens: sdpa {f['sdpa']:.3f} ms, student {f['student']:.3f} ms "
        f"(x {r['forward_ratio_student_over_sdpa']:.3f}); local+landmark {f['local_and_landmark']:.3f}, "
        f"kernel state {f['kernel_state']:.3f} + readout {f['kernel_readout']:.3f}, "
        f"mix {f['mix']:.3f}; pytorch branches {f['pytorch_branches_fp32']:.1f}; "
        f"fwd+bwd x {r['forward_backward_ratio_student_over_sdpa']:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1024,2048,4096")
    parser.add_argument(
        "--e2e", action="store_true", help="also the 4096 px Flux.1-dev forward (needs diffusers)"
    )
    parser.add_argument("--e2e-reps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULT)
    parser.add_argument("--sweep", type=int, default=0, help="px at which to time launch variants first")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("attention_bench needs a CUDA GPU")
    config = StudentConfig(heads=HEADS, head_dim=HEAD_DIM)
    result: dict = {"environment": environment(), "config": config.__dict__, "layers": []}
    if args.sweep:
        result["sweep"] = sweep(args.sweep, config)
        result["kernel_resources"] = kernel_resources()
        for row in result["kernel_resources"]:
            print(row, flush=True)
        torch.cuda.empty_cache()
    for px in (int(s) for s in args.sizes.split(",")):
        r = per_layer(px, config, seed=px)
        result["layers"].append(r)
        print(summary(r), flush=True)
        torch.cuda.empty_cache()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.e2e:
        e = end_to_end(config, 4096, args.e2e_reps)
        result["end_to_end"] = e
        sdpa_ms, student_ms = e["sdpa_forward"]["median_ms"], e["student_forward"]["median_ms"]
        print(
            f"e2e 4096 px: sdpa {sdpa_ms:.0f} ms, students {student_ms:.0f} ms, x {e['speedup']:.2f}",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
