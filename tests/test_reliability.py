"""Faults a cluster user hits, each survived or reported (docs/reliability.md), on the session's real
`ray start --head` cluster: `tessera run` as a subprocess for what a user sees (exit code, console,
job.json), `run_job` in this process where the result tensors are compared.

Every job is the tiny random model on a small crop of a real photo, two phases of a few steps; the
CLI runs share one pool (detached workers, reused by name) so only the first one loads a model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
import yaml
from PIL import Image

from runner.config import load_job

pytestmark = pytest.mark.cpu
REPO = Path(__file__).resolve().parents[1]
POOL = "rel"


def tessera(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "runner", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=REPO,
    )


def record(folder: Path) -> dict:
    return json.loads((folder / "job.json").read_text())


def crop(assets: Path, path: Path, box: tuple[int, int, int, int], name: str = "bird.png") -> Path:
    Image.open(assets / "images/eval/set5" / name).convert("RGB").crop(box).save(path)
    return path


def job_yaml(path: Path, **fields) -> Path:
    """Two phases of the tiny model, phase images on (so a phase has files of its own)."""
    job = {
        "task": "upscale",
        "pool": {"name": POOL, "workers": 1, "gpus_per_worker": 0.5},
        "model": {"kind": "random", "shape": "tiny"},
        "scale": 2.0,
        "phases": 2,
        "steps": 4,
        "denoise": [0.6, 0.4],
        "tiling": {"method": "multidiffusion", "tile": 64, "overlap": 16},
        "outputs": {"phase_images": True, "latent_stats": False, "compare_bicubic": False},
        **fields,
    }
    path.write_text(yaml.safe_dump(job))
    return path


@pytest.fixture(scope="module")
def cluster_env(ray_cluster):
    yield {"RAY_ADDRESS": ray_cluster.address}
    for name, size in ((POOL, 1), ("thr1", 1), ("thr2", 1)):
        for i in range(size):
            try:
                ray.kill(ray.get_actor(f"{name}-{i}", namespace="tessera"))
            except ValueError:
                pass


@pytest.fixture(scope="module")
def photo(tmp_path_factory, assets) -> Path:
    return crop(assets, tmp_path_factory.mktemp("photo") / "crop.png", (100, 100, 180, 164))


def checkpoint_file(folder: Path) -> Path:
    """The newest checkpoint of an upscale job (its name depends on the task's version)."""
    [path] = [p for p in (folder / "checkpoints").iterdir() if p.suffix in (".pt", ".safetensors")]
    return path


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# -- 1. a resume never returns another input's result ---------------------------------------------


def test_a_changed_input_is_not_resumed_from_the_old_checkpoint(cluster_env, assets, tmp_path):
    """Overwrite the input, run the same command: the old checkpoint is set aside (its fingerprint
    names the input's bytes) and the result is the new image's, equal to a fresh run on it."""
    from runner.run import run_job  # in process: the runs' files are what is checked, not the CLI

    image = crop(assets, tmp_path / "in.png", (100, 100, 180, 164))
    job = job_yaml(tmp_path / "job.yaml", image=str(image))
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    [first] = run_job(job, [f"output={out}"], stream=open(os.devnull, "w"))
    assert first.record["status"] == "succeeded"
    old = pixels(out / "result.png")
    crop(assets, image, (20, 30, 100, 94))  # another part of the photo, same size, same path
    [again] = run_job(job, [f"output={out}"], stream=open(os.devnull, "w"))
    assert again.record["status"] == "succeeded"
    rec = record(out)
    assert "resumed_from_phase" not in rec["records"]  # phases recomputed, none resumed
    [aside] = [
        s for s in rec["set_aside"] if s["file"].startswith("checkpoints/") and ".prev" not in s["file"]
    ]
    assert "inputs.image" in aside["reason"] and (out / aside["moved_to"]).is_file()
    assert (
        rec["fingerprint"]["inputs"]["image"]["sha256"]
        != record(out / "attempts/001")["fingerprint"]["inputs"]["image"]["sha256"]
    )
    [ref] = run_job(job, [f"output={fresh}"], stream=open(os.devnull, "w"))
    assert ref.record["status"] == "succeeded"
    assert np.array_equal(pixels(out / "result.png"), pixels(fresh / "result.png"))
    assert not np.array_equal(pixels(out / "result.png"), old)


def test_the_fingerprint_names_weights_inputs_and_settings_that_change_numbers(assets, tmp_path):
    """Each part of the fingerprint moves with what it covers: the weight files' bytes, the input's
    bytes, a setting that changes numbers; an artifact switch and the output folder do not."""
    from runner.fingerprint import Fingerprint, job_fingerprint

    weights = tmp_path / "reference"
    shutil.copytree(REPO / "models/reference", weights)
    image = crop(assets, tmp_path / "in.png", (100, 100, 180, 164))
    job = job_yaml(tmp_path / "job.yaml", image=str(image), output=str(tmp_path / "o"))
    ref = ["model.kind=reference", f"model.path={weights}", "model.vae=taef2"]
    base = job_fingerprint(load_job(job, ref))

    def diff(*overrides: str) -> list[str]:
        return job_fingerprint(load_job(job, [*ref, *overrides])).differences(base.as_dict())

    assert diff() == []
    assert diff("outputs.phase_images=false", f"output={tmp_path / 'elsewhere'}") == []
    assert diff("seed=1") == ["config"] and diff("pool.max_batch=2") == ["config"]
    assert set(base.weights["model"]) == {"path", "vae"} and base.numerics == {"model_cpu_threads": 1}
    shard = next((weights / "transformer").glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # one bit of the weights
    shard.write_bytes(bytes(data))
    assert diff() == ["weights.model"]
    crop(assets, image, (20, 30, 100, 94))
    assert diff() == ["inputs.image", "weights.model"]
    assert Fingerprint("a", {}, {}, "c").differences(None) == ["(no fingerprint stored)"]


# -- 3. a failed job's record keeps what it measured ----------------------------------------------


def test_a_failed_job_keeps_its_pool_summary_fallbacks_timings_and_progress(ray_cluster, assets, tmp_path):
    """Phase 2's folder cannot be made (a file holds its name), so the job fails after both phases'
    model work; job.json still has the pool's summary, the input-crop fallback, the timings, the
    progress reached and the phase-1 checkpoint."""
    from runner.run import run_job

    image = crop(assets, tmp_path / "odd.png", (100, 100, 184, 170))  # 84 x 70: cropped to 80 x 64
    out = tmp_path / "out"
    out.mkdir()
    (out / "phase2").write_text("not a folder")
    job = job_yaml(tmp_path / "job.yaml", image=str(image), output=str(out))
    with pytest.raises(OSError):
        run_job(job, stream=open(os.devnull, "w"))
    rec = record(out)
    assert rec["status"] == "failed" and rec["error"]["type"] in ("FileExistsError", "NotADirectoryError")
    assert rec["pool"]["views"] > 0 and rec["pool"]["workers"] and "requeued_batches" in rec["pool"]
    assert any(f["what"] == "input crop" for f in rec["fallbacks"])
    assert rec["timings"]["evaluate_s"] > 0 and rec["timings"]["in_model_s"] > 0
    assert rec["progress"]["label"] == "phase2" and rec["progress"]["done"] == rec["progress"]["total"]
    [(name, saved)] = rec["checkpoints"].items()
    assert name.startswith("checkpoints/") and saved["progress"]["label"] == "phase1"


# -- 5. damaged files, attempts, a used folder ----------------------------------------------------


def test_a_truncated_input_is_refused_before_ray_starts(cluster_env, photo, tmp_path):
    broken = tmp_path / "broken.png"
    data = Path(photo).read_bytes()
    broken.write_bytes(data[: len(data) * 2 // 3])
    out = tmp_path / "out"
    proc = tessera(
        "run", str(job_yaml(tmp_path / "job.yaml", image=str(broken))), f"output={out}", env=cluster_env
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"image: '{broken}' is damaged or not an image" in proc.stderr and "truncated" in proc.stderr
    assert "ray:" not in proc.stdout and not out.exists()  # nothing started, nothing written


@pytest.fixture(scope="module")
def damaged_rerun(cluster_env, photo, tmp_path_factory) -> dict:
    """A finished two-phase job whose newest checkpoint is then truncated, and the same job again (both
    in process: their files are what is checked; the CLI's refusals are tested below)."""
    from runner.run import run_job

    root = tmp_path_factory.mktemp("damaged")
    job, out = job_yaml(root / "job.yaml", image=str(photo)), root / "out"
    [first] = run_job(job, [f"output={out}"], stream=open(os.devnull, "w"))
    assert first.record["status"] == "succeeded"
    before = {"record": record(out), "result": pixels(out / "result.png")}
    ckpt = checkpoint_file(out)
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    [again] = run_job(job, [f"output={out}"], stream=open(os.devnull, "w"))
    return {"job": job, "out": out, "ckpt": ckpt, "before": before, "again": again}


def test_a_damaged_checkpoint_is_set_aside_and_its_phase_recomputed(damaged_rerun):
    out, again, before = damaged_rerun["out"], damaged_rerun["again"], damaged_rerun["before"]
    assert again.record["status"] == "succeeded"
    rec = record(out)
    [aside] = rec["set_aside"]
    name = damaged_rerun["ckpt"].name
    assert aside["file"] == f"checkpoints/{name}" and aside["moved_to"] == f"checkpoints/{name}.damaged"
    assert len((out / aside["moved_to"]).read_bytes()) == 100  # renamed, not deleted
    assert {f["what"] for f in rec["fallbacks"]} >= {"checkpoint set aside (damaged)", "previous checkpoint"}
    assert rec["records"]["resumed_from_phase"] == 1  # phase 1's checkpoint: phase 2 ran again
    assert np.array_equal(pixels(out / "result.png"), before["result"])


def test_a_resumed_run_labels_its_views_with_their_phase(damaged_rerun):
    """The resumed run ran phase 2 only; its views are phase 2's, under that name."""
    assert damaged_rerun["again"].record["status"] == "succeeded"
    views = record(damaged_rerun["out"])["records"]["views_per_step"]
    assert views["phase2"] == damaged_rerun["before"]["record"]["records"]["views_per_step"]["phase2"]


def test_a_rerun_keeps_every_earlier_attempts_record(damaged_rerun):
    out, before = damaged_rerun["out"], damaged_rerun["before"]["record"]
    rec, kept = record(out), record(out / "attempts/001")
    assert kept == before  # the first attempt's job.json, unchanged
    assert rec["attempt"] == 2 and [p["attempt"] for p in rec["previous_attempts"]] == [1]
    assert rec["previous_attempts"][0]["status"] == "succeeded"
    first = [json.loads(line) for line in (out / "attempts/001/metrics.jsonl").read_text().splitlines()]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(first) == sum(len(v) for v in before["records"]["views_per_step"].values())
    phase2_steps = len(before["records"]["views_per_step"]["phase2"])
    assert [m["phase"] for m in lines] == [2] * phase2_steps  # this attempt's steps only


def test_other_settings_into_a_used_folder_are_refused_unless_overwrite(damaged_rerun, cluster_env, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(damaged_rerun["out"], out)
    job = str(damaged_rerun["job"])
    refused = tessera("run", job, f"output={out}", "phases=1", "denoise=[0.5]", env=cluster_env)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "holds a job with other settings (denoise" in refused.stderr and "phases: 2 -> 1" in refused.stderr
    assert "ray:" not in refused.stdout and record(out)["config"]["phases"] == 2  # nothing touched
    replaced = tessera(
        "run", job, f"output={out}", "phases=1", "denoise=[0.5]", "--overwrite", env=cluster_env
    )
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    rec = record(out)
    assert rec["config"]["phases"] == 1 and rec["attempt"] == 3 and rec["replaced"] == "attempts/002/files"
    assert not (out / "phase2").exists() and (out / "attempts/002/files/phase2/result.png").is_file()
    assert record(out / "attempts/002")["config"]["phases"] == 2
    assert rec["set_aside"] == [] and "resumed_from_phase" not in rec["records"]  # a fresh start


# -- 6. the result does not depend on the worker's CPU count --------------------------------------


def test_results_do_not_depend_on_cpus_per_worker(ray_cluster, photo, tmp_path):
    from runner.run import run_job

    job = job_yaml(tmp_path / "job.yaml", image=str(photo))
    results, threads = [], []
    for cpus in (1, 2):
        over = [f"output={tmp_path / str(cpus)}", f"pool.name=thr{cpus}", f"pool.cpus_per_worker={cpus}"]
        [outcome] = run_job(job, over, stream=open(os.devnull, "w"))
        results.append(outcome.result.image)
        threads.append([w["torch_threads"] for w in outcome.record["pool"]["workers"]])
    assert torch.equal(results[0], results[1])
    assert threads == [[1], [1]]  # the model's thread count, whatever the worker reserved


# -- 7. secrets never reach a record ---------------------------------------------------------------

SECRET = "sk-tessera-test-0f3c9a71"  # a made-up key: it must reach no file of the job


def files_holding(folder: Path, text: str) -> list[str]:
    """Files under `folder` whose name or bytes hold `text`, members of zip archives (Comet's offline
    archive) read uncompressed."""
    import zipfile

    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        blobs = [path.read_bytes()]
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                blobs += [z.read(name) for name in z.namelist()]
        if text in str(path.relative_to(folder)) or any(text.encode() in b for b in blobs):
            found.append(str(path.relative_to(folder)))
    return found


def test_a_secret_in_the_environment_reaches_no_file_of_the_job(cluster_env, photo, tmp_path):
    """COMET_API_KEY set and used (Comet online, which falls back to offline here: no network): the
    key reaches no file of the job's output, not job.json, metrics, the Comet archive or a name, nor
    the console. (A job file or override that reads it, `${oc.env:...}`, is refused before anything
    is written: tests/test_job_config.py::test_environment_interpolation_is_refused.)"""
    job = job_yaml(tmp_path / "job.yaml", image=str(photo), phases=1, denoise=[0.5], steps=2)
    out = tmp_path / "out"
    env = {**cluster_env, "COMET_API_KEY": SECRET}
    used = tessera("run", str(job), f"output={out}", "tracking.comet=online", env=env)
    assert used.returncode == 0, used.stderr[-3000:]
    rec = record(out)
    assert any(f["what"] == "comet offline" for f in rec["fallbacks"]) and list((out / "comet").glob("*.zip"))
    assert files_holding(out, SECRET) == [] and SECRET not in used.stdout + used.stderr
    assert "metrics.jsonl" in files_holding(out, rec["run_id"])  # the scan reads what it must


# -- 11. a job far beyond the model's scale --------------------------------------------------------


def test_a_job_far_beyond_the_models_scale_is_refused_with_its_estimate(cluster_env, assets, tmp_path):
    image = crop(assets, tmp_path / "in.png", (0, 0, 256, 256), name="butterfly.png")
    job = job_yaml(tmp_path / "job.yaml", image=str(image), phases=0, scale=64.0)
    proc = tessera("run", str(job), f"output={tmp_path / 'out'}", env=cluster_env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "16384 x 16384 px (268.4 MP) in 6 phase(s)" in proc.stderr
    assert "views per step" in proc.stderr and "forwards" in proc.stderr and "--allow-large" in proc.stderr
    assert "ray:" not in proc.stdout


def test_the_estimate_counts_the_demos_views(assets):
    """clusters/demo_upscale.yaml: 256 -> 512 -> 1024 px with 256 px tiles (64 px overlap) and dilated
    views: 9 + 4 views a step for 10 steps, then 25 + 16 for 7, as its job.json records (130 + 287)."""
    from runner.estimate import upscale

    demo = load_job(
        REPO / "clusters/demo_upscale.yaml", [f"image={assets / 'images/eval/set5/butterfly.png'}"]
    )
    estimate = upscale(demo.config)
    assert (estimate.height, estimate.width, estimate.phases) == (1024, 1024, 2)
    assert estimate.views_per_step == [13, 41] and estimate.forwards == 13 * 10 + 41 * 7


def test_a_folder_in_use_by_a_running_job_is_refused(photo, tmp_path):
    """A job.json saying `running`, by a live process of this machine: another driver is writing
    there, so a second job is refused, with --overwrite too."""
    import socket

    from runner.config import JobConfigError
    from runner.run import preflight

    out = tmp_path / "out"
    out.mkdir()
    job = load_job(job_yaml(tmp_path / "job.yaml", image=str(photo)), [f"output={out}"])
    live = {"status": "running", "host": socket.gethostname(), "pid": os.getpid(), "config": job.resolved}
    (out / "job.json").write_text(json.dumps(live))
    for overwrite in (False, True):
        with pytest.raises(JobConfigError, match=f"is in use: .* still running \\(pid {os.getpid()}\\)"):
            preflight(job, overwrite=overwrite, allow_large=False)
    (out / "job.json").write_text(json.dumps({**live, "status": "failed"}))
    preflight(job, overwrite=False, allow_large=False)  # same settings, not running: a resume


def test_a_state_checkpoint_that_is_damaged_or_of_another_job_is_set_aside(tmp_path):
    """ctx.save_state / load_state (torch files, as training and the upscale task write them): the
    newest file damaged -> the one before it; another job's fingerprint -> nothing, both set aside."""
    from runner.context import JobArtifacts
    from runner.fingerprint import Fingerprint

    mine, other = Fingerprint("a", {}, {}, "c"), Fingerprint("a", {"image": {"sha256": "1"}}, {}, "c")
    arts = JobArtifacts(tmp_path, stream=open(os.devnull, "w"), fingerprint=mine)
    arts.save_state("ckpt/state.pt", {"step": 1, "w": torch.ones(3)})
    arts.save_state("ckpt/state.pt", {"step": 2, "w": torch.zeros(3)})
    path = tmp_path / "ckpt/state.pt"
    path.write_bytes(path.read_bytes()[:-200])
    state = JobArtifacts(tmp_path, stream=open(os.devnull, "w"), fingerprint=mine).load_state("ckpt/state.pt")
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert (tmp_path / "ckpt/state.pt.damaged").is_file()
    stale = JobArtifacts(tmp_path, stream=open(os.devnull, "w"), fingerprint=other)
    assert stale.load_state("ckpt/state.pt") is None
    [aside] = stale.set_aside
    assert aside["moved_to"] == "ckpt/state.pt.prev.stale" and "inputs.image" in aside["reason"]
    assert (
        torch.load(tmp_path / "ckpt/state.pt.prev.stale", weights_only=True)["__fingerprint__"]["config"]
        == "a"
    )
