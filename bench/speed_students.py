"""A students bundle for speed benchmarks only: untrained students for every attention layer of a
Flux.1-dev-shaped transformer, marked ready so that every layer serves.

The jobs of `bench/upscale_bench.py routed` measure what routing costs and saves in time on a
random-weight transformer; a student trained on random weights would be no more meaningful, and the
readiness gate (which a distillation run decides) would keep it from serving. The manifest says so
(meta.purpose), so the bundle cannot pass for a trained one.

    python bench/speed_students.py OUT_FOLDER
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.attention.config import StudentConfig  # noqa: E402
from core.attention.student import build_student  # noqa: E402
from core.models.flux import FLUX_DEV_CONFIG, tiny_flux_config  # noqa: E402
from runner.distill.bundle import LayerEntry, StudentsBundle, save_bundle  # noqa: E402

PURPOSE = "speed benchmark only: untrained students marked ready so that every layer serves"


def speed_bundle(folder: Path, shape: str = "flux-dev") -> Path:
    """The bundle for the random model of `shape` ("flux-dev", or "tiny" for a CPU smoke test)."""
    model = FLUX_DEV_CONFIG if shape == "flux-dev" else tiny_flux_config(32)
    config = StudentConfig(heads=model["num_attention_heads"], head_dim=model["attention_head_dim"])
    keys = [f"double:{i}" for i in range(model["num_layers"])]
    keys += [f"single:{i}" for i in range(model["num_single_layers"])]
    layers = {
        key: LayerEntry.of(key, build_student(config, seed=i), ready=True, may_serve=True)
        for i, key in enumerate(keys)
    }
    meta = {"purpose": PURPOSE, "model": {"kind": "random", "shape": shape}}
    return save_bundle(folder, StudentsBundle(layers=layers, meta=meta))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--shape", default="flux-dev", choices=["flux-dev", "tiny"])
    args = parser.parse_args()
    print(speed_bundle(args.folder, args.shape))


if __name__ == "__main__":
    main()
