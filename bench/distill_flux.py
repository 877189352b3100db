"""Summarise bench/distill_flux.sh: capture overhead, captures/s, updates/s and peak memory per worker.

    python bench/distill_flux.py GEN_1024 DISTILL_1024 GEN_2048 DISTILL_2048 --out distill_flux.json

Each argument is a job's output folder (its job.json). Capture overhead at a size is the teacher
sampling time per step of the distillation job (tasks/distill.py run_timings: sampling with capture,
before training; the median over its runs, the first run included, so a cold start shows) against
the forward time per step of the generation job at the same size (timings.in_model_s over its
seeds x steps forwards), on the same worker kind in the same call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment  # noqa: E402


def peaks(node) -> list[float]:
    """Every peak_allocated_gib in a job record (one per worker)."""
    if isinstance(node, dict):
        own = [node["peak_allocated_gib"]] if "peak_allocated_gib" in node else []
        return own + [p for k, v in node.items() if k != "peak_allocated_gib" for p in peaks(v)]
    if isinstance(node, list):
        return [p for v in node for p in peaks(v)]
    return []


def size_row(gen: dict, distill: dict) -> dict:
    gcfg, dcfg = gen["config"], distill["config"]
    forwards = len(gcfg["seeds"]) * gcfg["steps"]
    gen_step = gen["timings"]["in_model_s"] / forwards
    runs = distill["records"]["run_timings"]
    steps = dcfg["teacher"]["steps"]
    sample_step = [r["sample_s"] / steps for r in runs]
    train = [r["train_s"] for r in runs]
    captures = sum(r["captures"] for r in runs)
    summary = distill["records"]["summary"]
    return {
        "px": dcfg["teacher"]["sizes"][0],
        "generate_forward_s_per_step": round(gen_step, 4),
        "distill_sample_s_per_step_median": round(statistics.median(sample_step), 4),
        "distill_sample_s_per_step_runs": [round(s, 4) for s in sample_step],
        "capture_overhead": round(statistics.median(sample_step) / gen_step - 1.0, 4),
        "capture_overhead_warm_runs": round(min(sample_step) / gen_step - 1.0, 4),
        "captures": captures,
        "capture_bytes": sum(r["capture_bytes"] for r in runs),
        "captures_per_s_sampling": round(captures / sum(r["sample_s"] for r in runs), 3),
        "capture_writer_s_runs": [
            {k: r.get(k) for k in ("capture_stall_s", "capture_close_s", "capture_write_s")} for r in runs
        ],
        "train_s_runs": train,
        "updates": summary.get("updates"),
        "throughput": distill["records"]["throughput"],
        "layers_trained": len(distill["records"]["layers"]),
        "updates_per_s_per_trained_layer": round(
            summary.get("updates", 0) / max(sum(train), 1e-9) / max(len(distill["records"]["layers"]), 1), 4
        ),
        "updates_per_s_training": round(summary.get("updates", 0) / max(sum(train), 1e-9), 3),
        "peak_allocated_gib_generate": peaks(gen.get("pool", {})),
        "peak_allocated_gib_distill": peaks(distill),
        "fallbacks": distill.get("fallbacks", []),
        "oom_ladders": distill["records"].get("oom_ladders"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path, help="generate, distill output folders, per size")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if len(args.folders) % 2:
        ap.error(f"folders come in (generate, distill) pairs, got {len(args.folders)}")
    jobs = [json.loads((f / "job.json").read_text()) for f in args.folders]
    rows = [size_row(jobs[i], jobs[i + 1]) for i in range(0, len(jobs), 2)]
    result = {"bench": "distill_flux", "environment": environment(), "goal_capture_overhead": 0.1}
    result["sizes"] = rows
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
