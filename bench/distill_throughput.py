"""Distillation throughput on this machine's CPU: captures/s and updates/s with 1 and 2 workers.

    python bench/distill_throughput.py                  # clusters/distill_ci.yaml, bigger
    python bench/distill_throughput.py --runs 12 --size 256

Each worker count runs the same job (the CI job's shape with more runs) on a local Ray, on a pool
of its own (so each measures a cold start: the model loads before the first run, outside the rate).
The rates are the task's own (tasks/distill.py: updates and captures over the wall time of the
run loop, from the first run to the last checkpoint). The students of the two runs are compared:
they must be equal (docs/distill.md), and the result says so.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=12)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default="/tmp/distill_throughput")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from runner.distill.bundle import load_bundle
    from runner.pool.lifecycle import stop_workers
    from runner.run import run_job

    base = yaml.safe_load((REPO / "clusters/distill_ci.yaml").read_text())
    base["teacher"] = {**base["teacher"], "runs": args.runs, "sizes": [args.size], "steps": args.steps}
    base["training"] = {**base["training"], "updates": 10**6, "updates_per_capture": 2}
    base["layer_groups"] = 2
    results, bundles = {}, {}
    for workers in (1, 2):
        spec = {
            **base,
            "output": f"{args.out}/w{workers}",
            "pool": {**base["pool"], "name": f"tp{workers}", "workers": workers},
        }
        path = Path(args.out) / f"w{workers}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(spec))
        try:
            [outcome] = run_job(path, stream=open(os.devnull, "w"))
        finally:
            stop_workers(f"tp{workers}")
        rec = outcome.record["records"]
        results[str(workers)] = {
            **rec["throughput"],
            "updates": rec["summary"]["updates"],
            "captures": rec["summary"]["captures"],
        }
        bundles[workers] = load_bundle(Path(spec["output"]) / "students")
    same = all(
        all(
            (a == b).all()
            for a, b in zip(e.weights.values(), bundles[2].layers[k].weights.values(), strict=True)
        )
        for k, e in bundles[1].layers.items()
    )
    result = {
        "environment": environment(),
        "job": {"runs": args.runs, "size": args.size, "steps": args.steps, "layer_groups": 2, "layers": 6},
        "workers": results,
        "speedup_updates": results["2"]["updates_per_s"] / results["1"]["updates_per_s"],
        "students_equal_1_vs_2_workers": bool(same),
        "load_average": os.getloadavg(),
    }
    print(json.dumps(result, indent=2))
    write_result("distill_throughput", result)


if __name__ == "__main__":
    main()
