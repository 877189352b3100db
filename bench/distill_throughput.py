"""Distillation throughput on CPU workers: captures/s and updates/s with 1 and 2 workers, through
`tessera run` of a distill job file.

    python bench/distill_throughput.py                                  # 12 runs at 256 px, 4 steps
    python bench/distill_throughput.py --runs 4 --size 128 --steps 2    # a small check

Each worker count is one `python -m runner run JOB.yaml` in its own process (a private local Ray,
started and ended by that command; RAY_ADDRESS is cleared), of the same job: the reference model,
every attention layer in `--groups` layer groups (a multiple of 2, so both workers of the 2-worker
run own groups), CPU workers of `--cpus-per-worker` CPUs each (the same torch thread count for both
worker counts, which the students' equality needs: docs/distill.md). The figures are read back from
each job's job.json:

- captures_per_s, updates_per_s: the task's own rates (records.throughput: captures and updates over
  the wall time of the run loop, first run to last checkpoint; the model loads before, outside it);
- sampling_captures_per_s, training_updates_per_s: over the runs' summed sampling and training times
  (records.run_timings), per worker: what one worker does while it samples or trains;
- command_wall_s: the whole command, Ray start and model loads included.

The students of the two runs are compared tensor by tensor: they must be equal.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def job_spec(args: argparse.Namespace, workers: int) -> dict:
    """The distill job of one worker count (the CI job's shape, larger; a budget that never binds)."""
    base = yaml.safe_load((REPO / "clusters/distill_ci.yaml").read_text())
    return {
        **base,
        "output": str(Path(args.out) / f"w{workers}"),
        "pool": {
            "name": f"distill-throughput-{workers}",
            "workers": workers,
            "device": "cpu",
            "cpus_per_worker": args.cpus_per_worker,
        },
        "layer_groups": args.groups,
        "teacher": {**base["teacher"], "runs": args.runs, "sizes": [args.size], "steps": args.steps},
        "capture": {**base["capture"], "query_cap": args.query_cap},
        "training": {**base["training"], "updates": 10**6, "updates_per_capture": 2},
        "checkpoint_every": args.runs,
        "log_every": 10**6,
    }


def run_job(path: Path, output: Path) -> tuple[dict, float]:
    """`python -m runner run path` in a fresh process with a private Ray; (its job.json, wall s)."""
    pythonpath = os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])
    )  # keeps /tmp/site
    env = {**os.environ, "PYTHONPATH": pythonpath, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "runner", "run", str(path)], cwd=REPO, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(
            f"tessera run {path} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return json.loads((output / "job.json").read_text()), wall


def figures(record: dict, wall: float, workers: int) -> dict:
    rec = record["records"]
    runs = rec["run_timings"]
    sample_s = sum(r["sample_s"] for r in runs)
    train_s = sum(r["train_s"] for r in runs)
    captures = sum(r["captures"] for r in runs)
    updates = rec["summary"]["updates"]
    return {
        "status": record["status"],
        "captures_per_s": round(rec["throughput"]["captures_per_s"], 4),
        "updates_per_s": round(rec["throughput"]["updates_per_s"], 4),
        "run_loop_wall_s": rec["throughput"]["wall_s"],
        "runs": rec["throughput"]["runs"],
        "captures": int(rec["summary"]["captures"]),
        "updates": int(updates),
        "sampling_captures_per_s": round(captures / max(sample_s, 1e-9), 4),
        "training_updates_per_s": round(updates / max(train_s, 1e-9), 4),
        "sample_s": round(sample_s, 3),
        "train_s": round(train_s, 3),
        "command_wall_s": round(wall, 2),
        "workers": workers,
    }


def same_students(a: Path, b: Path) -> bool:
    from runner.distill.bundle import load_bundle

    x, y = load_bundle(a / "students"), load_bundle(b / "students")
    if list(x.layers) != list(y.layers):
        return False
    return all(
        x.layers[k].weights.keys() == y.layers[k].weights.keys()
        and all(bool((x.layers[k].weights[n] == y.layers[k].weights[n]).all()) for n in x.layers[k].weights)
        for k in x.layers
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=12, help="teacher runs per job")
    ap.add_argument("--size", type=int, default=256, help="teacher image size, px")
    ap.add_argument("--steps", type=int, default=4, help="Euler steps per teacher run")
    ap.add_argument("--groups", type=int, default=2, help="layer groups (a multiple of 2)")
    ap.add_argument("--query-cap", type=int, default=64, help="queries kept per capture")
    ap.add_argument("--cpus-per-worker", type=float, default=1, help="CPUs (torch threads) per worker")
    ap.add_argument("--out", default="/tmp/distill_throughput", help="job files and outputs")
    ap.add_argument("--note", default="", help="a line on the machine's state, kept in the result")
    args = ap.parse_args()
    if args.groups % 2:
        ap.error(f"--groups must be a multiple of 2 (both workers own groups), got {args.groups}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    results, commands = {}, {}
    for workers in (1, 2):
        spec = job_spec(args, workers)
        path = out / f"w{workers}.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        commands[str(workers)] = f"python -m runner run {path}"
        record, wall = run_job(path, Path(spec["output"]))
        results[str(workers)] = figures(record, wall, workers)
        print(f"[distill_throughput] {workers} worker(s): {json.dumps(results[str(workers)])}", flush=True)
    one, two = results["1"], results["2"]
    result = {
        "bench": "distill_throughput",
        "environment": environment(),
        "note": args.note,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "job": {
            "model": "reference",
            "layers": 6,
            "layer_groups": args.groups,
            "runs": args.runs,
            "size": args.size,
            "steps": args.steps,
            "query_cap": args.query_cap,
            "cpus_per_worker": args.cpus_per_worker,
            "updates_per_capture": 2,
        },
        "commands": commands,
        "workers": results,
        "speedup_captures_per_s": round(two["captures_per_s"] / one["captures_per_s"], 3),
        "speedup_updates_per_s": round(two["updates_per_s"] / one["updates_per_s"], 3),
        "students_equal_1_vs_2_workers": same_students(out / "w1", out / "w2"),
    }
    print(json.dumps(result, indent=2))
    print(f"wrote {write_result('distill_throughput', result)}")


if __name__ == "__main__":
    main()
