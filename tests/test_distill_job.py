"""task: distill on a real local Ray with the reference model: 1, 2 and 3 workers train the same
students bit for bit, a resumed job equals an uninterrupted one, a worker killed mid-run is replaced
and the students still equal the undisturbed run's, and the bundle served in an upscale job changes
only the routed layers.

All jobs share one pool of three workers (reused by name, so the model loads once per worker) and
the CI-sized job of clusters/distill_ci.yaml: all 6 layers in 3 groups, 6 teacher runs of 2 steps
at 128 px, non-binding replay budgets (the equivalence needs them: docs/distill.md)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import ray
import torch
import yaml

from runner.config import load_job
from runner.context import JobArtifacts
from runner.distill.bundle import load_bundle
from runner.fingerprint import job_fingerprint
from runner.pool.lifecycle import stop_workers
from runner.pool.pool import connect_pool
from runner.pool.worker import ModelWorker
from runner.ray_init import init_ray
from runner.run import run_job

pytestmark = [pytest.mark.cpu, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
CI_JOB = REPO / "clusters" / "distill_ci.yaml"
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Preempted(RuntimeError):
    """Raised right after the first checkpoint, as a preemption would end the driver."""


class PreemptedArtifacts(JobArtifacts):
    def save_state(self, name, state):
        out = super().save_state(name, state)
        raise Preempted(name)
        return out


class KillInSecondRun(ModelWorker):
    """Worker 1 SIGKILLs its own process in its second teacher run, once (MARKER file)."""

    MARKER = ""

    def distill_run(self, job, run):
        self.runs = getattr(self, "runs", 0) + 1
        if self.index == 1 and self.runs == 2 and not os.path.exists(self.MARKER):
            Path(self.MARKER).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return super().distill_run(job, run)


def job_file(tmp: Path, name: str, workers: int, pool: str = "distill-ci") -> Path:
    spec = yaml.safe_load(CI_JOB.read_text())
    spec["output"] = str(tmp / name)
    # half a CPU each: the kill test's pool fits beside the shared one on the session's 4 CPUs
    spec["pool"] = {**spec["pool"], "name": pool, "workers": workers, "cpus_per_worker": 0.5}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def students(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    bundle = load_bundle(folder / "students")
    return {k: e.weights for k, e in bundle.layers.items()}


def assert_same_students(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}/{name} differs"


def quiet():
    return open(os.devnull, "w")


@pytest.fixture(scope="module")
def runs(ray_cluster, tmp_path_factory):
    """The CI job with 1, 2 and 3 workers of one pool: {workers: outcome}."""
    tmp = tmp_path_factory.mktemp("distill")
    out = {}
    try:
        for workers in (3, 1, 2):  # the first job creates all three workers
            [out[workers]] = run_job(job_file(tmp, f"w{workers}", workers), stream=quiet())
        yield tmp, out
    finally:
        stop_workers("distill-ci")


def test_one_two_and_three_workers_train_the_same_students(runs):
    tmp, out = runs
    for workers, outcome in out.items():
        assert outcome.record["status"] == "succeeded"
        assignment = outcome.record["records"]["assignment"]
        assert assignment["group_worker"] == {str(g): g % workers for g in range(3)}
    reference = students(tmp / "w1")
    assert len(reference) == 6
    for workers in (2, 3):
        assert_same_students(reference, students(tmp / f"w{workers}"))
        assert out[workers].result.rows == out[1].result.rows  # losses, cosines, readiness: every run
    summary = out[1].record["records"]["summary"]
    assert summary["updates"] > 0 and summary["captures"] > 0


def test_resume_equals_uninterrupted(runs):
    tmp, out = runs
    path = job_file(tmp, "resumed", 2)
    job = load_job(path)
    init_ray()
    from runner.distill.job import run_distill

    with pytest.raises(Preempted):
        arts = PreemptedArtifacts(Path(job.runner.output), stream=quiet(), fingerprint=job_fingerprint(job))
        run_distill(job, arts)  # stamped as the runner stamps it, so the resumed job accepts it
    [outcome] = run_job(path, stream=quiet())
    assert outcome.record["records"]["resumed_at_run"] == 2  # checkpoint_every: 2
    assert outcome.result.rows == out[2].result.rows
    assert_same_students(students(tmp / "w2"), students(tmp / "resumed"))


def test_a_worker_killed_mid_run_is_replaced_and_its_layers_resume(runs, tmp_path):
    tmp, out = runs
    killer = type("Killer", (KillInSecondRun,), {"MARKER": str(tmp_path / "killed")})
    path = job_file(tmp, "killed", 2, pool="distill-kill")
    job = load_job(path)
    connect_pool(job.runner.pool, job.config.model, worker_cls=killer)
    try:
        [outcome] = run_job(path, stream=quiet())
    finally:
        stop_workers("distill-kill")
    assert (tmp_path / "killed").is_file()  # the fault happened
    whats = [f["what"] for f in outcome.record["fallbacks"]]
    assert "distill chunk restarted" in whats
    assert "worker replaced" in [f["what"] for f in outcome.record["pool"]["fallbacks"]]
    assert outcome.result.rows == out[2].result.rows
    assert_same_students(students(tmp / "w2"), students(tmp / "killed"))


def test_the_bundle_in_an_upscale_job_changes_only_the_routed_layers(runs, assets, tmp_path):
    """Upscale (in process) with the distilled students: with none routed it is the teacher bit for
    bit; with one layer routed only that layer's calls go to its student."""
    from core.models.loading import ModelSpec
    from runner.context import JobContext, LocalModelPool
    from runner.models import load_model
    from tasks.distill_attention import AttentionConfig
    from tasks.upscale import run
    from tasks.upscale_config import CoherenceConfig, OutputsConfig, TilingConfig, UpscaleConfig

    tmp, _ = runs
    bundle = load_bundle(tmp / "w1" / "students")
    ready = bundle.servable()
    assert ready, "the CI job's readiness threshold makes layers ready"
    from PIL import Image

    crop = tmp_path / "crop.png"
    Image.open(assets / "images/eval/set5/bird.png").convert("RGB").crop((100, 100, 164, 164)).save(crop)
    model = load_model(ModelSpec(kind="reference"), "cpu")
    quiet_outputs = OutputsConfig(
        phase_images=False, latent_stats=False, compare_bicubic=False, checkpoints=False
    )
    cfg = UpscaleConfig(
        model=ModelSpec(kind="reference"), image=str(crop), target=(128, 128),
        phases=1, steps=2, denoise=(0.5,), skip_residual=None, coherence=CoherenceConfig(dilated=0),
        tiling=TilingConfig(method="none"),
        outputs=quiet_outputs,
    )  # fmt: skip

    def upscale(name: str, layers: str | None):
        pool = LocalModelPool(model)
        if layers is not None:
            pool.serve_students(AttentionConfig(students=str(tmp / "w1" / "students"), layers=layers))
        result = run(cfg, JobContext(JobArtifacts(tmp_path / name, stream=quiet()), pool))
        return result.image, pool.summary().get("attention")

    teacher, _ = upscale("teacher", None)
    unrouted = (
        next(k for k in ("double:0", "double:1", "single:0") if k not in ready) if len(ready) < 6 else None
    )
    if unrouted is not None:
        same, record = upscale("none", unrouted)
        assert torch.equal(same, teacher) and record["routed"] == []
    one = ready[-1]
    routed, record = upscale("one", one)
    assert record["routed"] == [one]
    assert set(record["counters"]["layers"]) == {one}
    assert record["served_calls"] == record["counters"]["layers"][one]["calls"] > 0
    assert not torch.equal(routed, teacher)
