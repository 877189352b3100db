"""Every example job file runs through the runner on the session's Ray, on a small photo crop and
few steps (the tiny random model; the demo with the real reference model)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import ray
from PIL import Image

pytestmark = pytest.mark.cpu
REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "clusters/examples").glob("*.yaml")) + [REPO / "clusters/demo_upscale.yaml"]


@pytest.fixture(scope="module")
def crop(tmp_path_factory, assets) -> Path:
    path = tmp_path_factory.mktemp("examples") / "crop.png"
    Image.open(assets / "images/eval/set5/butterfly.png").convert("RGB").crop((64, 64, 144, 128)).save(path)
    return path


@pytest.fixture(scope="module")
def pools(ray_cluster):
    yield
    for name in ("examples", "examples-ref"):
        try:
            ray.kill(ray.get_actor(f"{name}-0", namespace="tessera"))
        except ValueError:
            pass


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(path, crop, tmp_path, pools):
    from runner.run import run_job

    reference = "kind: reference" in path.read_text() and path.stem == "demo_upscale"
    overrides = [
        f"image={crop}",
        f"output={tmp_path}",
        "steps=4",
        "pool.workers=1",
        "pool.gpus_per_worker=0.5",
        "pool.cpus_per_worker=1",
        f"pool.name={'examples-ref' if reference else 'examples'}",
    ]
    if not reference:
        overrides += ["model.kind=random", "model.shape=tiny", "tiling.tile=64", "tiling.overlap=16"]
    outcomes = run_job(path, overrides, stream=open(os.devnull, "w"))
    assert outcomes and all(o.record["status"] == "succeeded" for o in outcomes)
    for outcome in outcomes:
        record = json.loads((outcome.output / "job.json").read_text())
        assert (outcome.output / "result.png").is_file()
        assert record["records"]["views_per_step"], record["records"]
    if "sweep" in path.read_text():
        coords = json.loads((tmp_path / "sweep.json").read_text())
        assert len(coords) == 4 and {c["coords"]["seed"] for c in coords} == {0, 1}
