"""`tessera run` and `tessera submit|status|logs|stop|list|fetch` as a user runs them, against the
session's real `ray start --head` cluster; addresses, the submitted package, and the CLI's errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from PIL import Image

pytestmark = pytest.mark.cpu
REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "clusters/examples/tiny_tiled_img2img.yaml"


def tessera(
    *args: str, env: dict | None = None, timeout: int = 300, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        if env is None or name not in env:
            full_env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "runner", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=cwd,
    )


def kill_pool(name: str, size: int) -> None:
    for i in range(size):
        try:
            ray.kill(ray.get_actor(f"{name}-{i}", namespace="tessera"))
        except ValueError:
            pass


@pytest.fixture(scope="module")
def small_image(tmp_path_factory, assets) -> Path:
    path = tmp_path_factory.mktemp("cli") / "bird.png"
    Image.open(assets / "images/eval/set5/bird.png").convert("RGB").crop((64, 64, 160, 128)).save(path)
    return path


def test_run_writes_the_artifacts(ray_cluster, small_image, tmp_path):
    out = tmp_path / "run"
    proc = tessera(
        "run",
        str(EXAMPLE),
        f"image={small_image}",
        f"output={out}",
        "pool.name=cli",
        "tiling.tile=64",
        "tiling.overlap=16",
        env={"RAY_ADDRESS": ray_cluster.address},
    )
    kill_pool("cli", 1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in (
        "result.png",
        "bicubic.png",
        "comparison.png",
        "job.json",
        "metrics.jsonl",
        "phase1/result.png",
    ):
        assert (out / name).is_file(), name
    record = json.loads((out / "job.json").read_text())
    assert record["status"] == "succeeded"
    assert record["config"]["steps"] == 8 and record["seed"] == 0
    assert record["versions"]["torch"].startswith("2.")
    timings = record["timings"]
    assert timings["total_s"] > 0 and timings["in_model_s"] > 0 and "dispatch_overhead_s" in timings
    assert record["pool"]["workers"][0]["gpu_ids"]  # a fake GPU was reserved for the worker
    # 16 x 24 latent, 8-pixel tiles with overlap 2 (stride 6): 3 rows x 4 columns, 4 steps at denoise 0.5
    assert record["records"]["views_per_step"]["phase1"] == [12] * 4
    assert record["pool"]["evaluate_call_s_by_views"]["12"]["n"] == 4  # one evaluate call per step
    assert record["driver_threads"]["torch_threads"] <= 8 and "applied" in record["driver_malloc"]
    assert "[phase1] 4/4" in proc.stdout
    assert Image.open(out / "result.png").size == (192, 128)
    # the end of the record and of the console
    assert record["started"] <= record["finished"]
    assert record["source"]["origin"] == "git" and len(record["source"]["commit"]) == 40
    assert {"result.png", "comparison.png", "phase1/result.png", "job.json", "metrics.jsonl"} <= set(
        record["artifacts"]
    )
    summary = [line for line in proc.stdout.splitlines() if line.startswith("[summary]")]
    assert summary[0].startswith("[summary] upscale succeeded in 0:")
    assert "48 views in" in summary[1] and "views/s" in summary[1]  # 4 steps x 12 views
    assert summary[2].startswith(f"[summary] output {out}: result.png, comparison.png, bicubic.png")
    assert summary[3] == "[summary] fallbacks: none"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {line["run_id"] for line in lines} == {record["run_id"]}
    steps = [line["step"] for line in lines]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)


def test_run_to_a_storage_uri_stages_syncs_and_resumes(ray_cluster, small_image, tmp_path):
    """output=file://...: the job writes to a staging folder, its files reach the URI, and a re-run
    (on any node: the staging folder is emptied first) pulls them and resumes after phase 1."""
    store = (tmp_path / "store").as_uri()
    args = (
        "run",
        str(EXAMPLE),
        f"image={small_image}",
        f"output={store}/job",
        "pool.name=cli-uri",
        "tiling.tile=64",
    )
    env = {"RAY_ADDRESS": ray_cluster.address}
    first = tessera(*args, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"[storage] results in {store}/job (" in first.stdout
    record = json.loads((tmp_path / "store/job/job.json").read_text())
    assert record["config"]["output"].endswith("/job") and record["config"]["output"] != f"{store}/job"
    assert record["records"].get("resumed_from_phase") is None
    second = tessera(*args, env=env)
    kill_pool("cli-uri", 1)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"[storage] pulled {len(record['artifacts'])} files from {store}/job" in second.stdout
    again = json.loads((tmp_path / "store/job/job.json").read_text())
    assert again["records"].get("resumed_from_phase") is not None  # from the pulled checkpoint
    assert again["run_id"] != record["run_id"]
    assert (tmp_path / "store/job/result.png").read_bytes() == Path(first_result(first)).read_bytes()


def first_result(proc: subprocess.CompletedProcess) -> str:
    """The staged result.png of a run (its `done:` line names the staged job.json)."""
    done = next(line for line in proc.stdout.splitlines() if line.startswith("done: "))
    return done.removeprefix("done: ").replace("job.json", "result.png")


def one_line_error(proc: subprocess.CompletedProcess, text: str) -> None:
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and text in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.startswith("error:")]) == 1


def test_run_reports_bad_input_without_a_traceback(tmp_path):
    proc = tessera("run", str(EXAMPLE), "stepz=3", f"output={tmp_path}")
    one_line_error(proc, "unknown key stepz")
    proc = tessera("run", str(EXAMPLE), f"image={tmp_path / 'none.png'}", f"output={tmp_path}")
    one_line_error(proc, "does not exist")
    proc = tessera("run", str(EXAMPLE), "tracking.project=${oc.env:HOME}", f"output={tmp_path}")
    one_line_error(proc, "calls a resolver")


def test_addresses_that_run_cannot_join_fail_in_one_line(tmp_path):
    """The README once showed RAY_ADDRESS=http://HEAD:8265 for run: Ray's 'Invalid Ray address'
    traceback; an unreachable cluster: a minute of Ray's retries."""
    proc = tessera("run", str(EXAMPLE), f"output={tmp_path}", env={"RAY_ADDRESS": "http://127.0.0.1:8265"})
    one_line_error(proc, "is a dashboard (Jobs API) address: `tessera run` joins a cluster by its bootstrap")
    start = time.monotonic()
    proc = tessera("run", str(EXAMPLE), f"output={tmp_path}", "--address", "127.0.0.1:9")
    one_line_error(proc, "cannot reach Ray at 127.0.0.1:9")
    proc = tessera("status", "tessera-x", env={"RAY_API_SERVER_ADDRESS": "http://127.0.0.1:9"})
    one_line_error(proc, "cannot reach Ray at http://127.0.0.1:9")
    proc = tessera("list")
    one_line_error(proc, "no cluster address: pass --address")
    assert time.monotonic() - start < 60
    assert not (tmp_path / "job.json").exists()


def test_address_order_follows_ray():
    from runner.address import AddressError, cluster_address, jobs_address

    env = {"RAY_ADDRESS": "10.0.0.1:6379", "RAY_API_SERVER_ADDRESS": "http://10.0.0.2:8265"}
    assert jobs_address(None, env).value == "http://10.0.0.2:8265"
    assert jobs_address("http://10.0.0.3:8265/", env).value == "http://10.0.0.3:8265"
    assert jobs_address(None, {"RAY_ADDRESS": "10.0.0.1:6379"}).port == 6379
    assert (jobs_address("ray://h", {}).host, jobs_address("ray://h", {}).port) == ("h", 10001)
    assert cluster_address(None, env).value == "10.0.0.1:6379"
    assert cluster_address("ray://10.0.0.4:10001", env).port == 10001
    assert cluster_address(None, {}) is None  # a local Ray
    assert cluster_address("auto", {}).host is None
    with pytest.raises(AddressError, match="bootstrap address"):
        cluster_address(None, {"RAY_ADDRESS": "https://head.example:8265"})
    with pytest.raises(AddressError, match="bad port"):
        jobs_address("http://h:port", {})


def test_version_names_the_commit():
    proc = tessera("--version")
    assert proc.returncode == 0
    version, commit = proc.stdout.split("(git ")
    assert version.startswith("tessera 0.") and len(commit.split(",")[0].rstrip(")\n")) == 10


def test_dry_run_prints_the_job_and_its_sweep_and_starts_nothing(tmp_path, small_image):
    job = tmp_path / "sweep.yaml"
    job.write_text(EXAMPLE.read_text() + "sweep: {seed: [0, 1], tiling.method: [multidiffusion, mixture]}\n")
    out = tmp_path / "out"
    proc = tessera("run", str(job), "--dry-run", f"image={small_image}", f"output={out}", "denoise=0.4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    import yaml

    printed = yaml.safe_load(proc.stdout)
    assert printed["denoise"] == [0.4] and printed["image"] == str(small_image)
    assert "# sweep: 4 jobs" in proc.stdout
    assert f"#   {out}/003-seed=1,method=mixture: seed=1 tiling.method=mixture" in proc.stdout
    assert "# inputs checked for 4 jobs" in proc.stdout
    assert not out.exists()
    proc = tessera("run", str(job), "--print-config", f"image={small_image}", f"output={out}", "sweep={}")
    assert (
        proc.returncode == 0 and "# sweep" not in proc.stdout and "inputs checked for 1 job;" in proc.stdout
    )


def test_submit_uploads_inputs_and_fetch_gets_the_results(ray_cluster, small_image, tmp_path):
    """A job file with a relative input, submitted from its folder: the input is checked here and
    travels with the job; the results go to storage; follow, list, fetch and stop find the job."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "job.yaml").write_text(EXAMPLE.read_text())
    (work / "bird.png").write_bytes(small_image.read_bytes())
    store = tmp_path / "store"
    dash = ray_cluster.dashboard
    args = ("submit", "job.yaml", "image=bird.png", "pool.name=submitted", "tiling.tile=64")
    one_line_error(tessera(*args, "--address", dash, cwd=work), "output 'runs/tiny-img2img' is relative")
    proc = tessera(*args, "--address", dash, "--storage", store.as_uri(), cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sid = proc.stdout.strip().splitlines()[-1]
    assert sid.startswith("tessera-")
    assert "inputs: image: inputs/image/bird.png" in proc.stderr and "weights: taef2, lpips;" in proc.stderr
    follow = tessera("logs", sid, "--follow", env={"RAY_API_SERVER_ADDRESS": dash}, timeout=400)
    kill_pool("submitted", 1)
    assert follow.returncode == 0 and f"job {sid} SUCCEEDED" in follow.stderr, follow.stdout[-3000:]
    assert "[phase1] 4/4" in follow.stdout and "[summary] upscale succeeded" in follow.stdout
    results = store / "runs/tiny-img2img"
    record = json.loads((results / "job.json").read_text())
    assert record["config"]["image"] == "inputs/image/bird.png"
    assert record["source"]["origin"] == "package"  # the driver ran the package's code, not this checkout
    listing = tessera("list", "--address", dash)
    row = next(line for line in listing.stdout.splitlines() if line.startswith(sid))
    assert "SUCCEEDED" in row and "upscale" in row and row.endswith(results.as_uri())
    fetched = tessera("fetch", sid, str(tmp_path / "fetched"), "--address", dash)
    assert fetched.returncode == 0 and f"to {tmp_path / 'fetched'} (job SUCCEEDED)" in fetched.stdout
    assert (tmp_path / "fetched/result.png").read_bytes() == (results / "result.png").read_bytes()
    assert tessera("stop", sid, "--address", dash).stdout.strip() == "not running"
    one_line_error(tessera("status", "tessera-nope", "--address", dash), "no job 'tessera-nope' on")
    one_line_error(tessera("fetch", "tessera-nope", "--address", dash), "no job 'tessera-nope' on")


def test_submit_validates_and_checks_inputs_before_uploading(ray_cluster, tmp_path):
    dash = ray_cluster.dashboard
    out = f"output={tmp_path.as_uri()}/x"
    one_line_error(
        tessera("submit", str(EXAMPLE), "steps=-1", out, "--address", dash), "steps must be >= 1, got -1"
    )
    one_line_error(
        tessera("submit", str(EXAMPLE), f"image={tmp_path / 'none.png'}", out, "--address", dash),
        "does not exist",
    )
    one_line_error(
        tessera("submit", str(EXAMPLE), "image=in.png", out, "--inputs-on-cluster", "--address", dash),
        "with --inputs-on-cluster inputs are paths on the cluster's nodes",
    )


JOB_FILES = [
    f
    for f in sorted((REPO / "clusters").glob("*.yaml")) + sorted((REPO / "clusters/examples").glob("*.yaml"))
    if "task:" in f.read_text()
]


@pytest.mark.parametrize("path", JOB_FILES, ids=[f.stem for f in JOB_FILES])
def test_every_shipped_job_packages_for_submission(path, small_image, tmp_path):
    """`tessera submit` once failed on every shipped example; each now resolves its output and
    inputs here and packages (Flux's inputs are paths on the cluster: --inputs-on-cluster)."""
    from runner.config import load_job
    from runner.jobs import submitted_output
    from runner.package import build_package

    text = path.read_text()
    on_cluster = "kind: flux" in text
    if on_cluster:
        overrides = []
    elif "task: train_reference" in text:
        overrides = [f"train_dir={small_image.parent}", f"eval_dir={small_image.parent}"]
    elif "\ntask: controller" in text:  # before distill: its comments name the distill task
        overrides = [f"students={small_image.parent}"]  # a folder input, as a students bundle is
    elif "\ntask: distill" in text or "\ntask: generate" in text:
        overrides = []  # no input files
    else:
        overrides = [f"image={small_image}"]
    job = load_job(path, overrides)
    output = submitted_output(job, None if Path(job.runner.output).is_absolute() else "s3://bucket/tessera")
    pkg = build_package(
        job, tmp_path, job_name=path.name, output=output, base=path.parent, inputs_on_cluster=on_cluster
    )
    again = load_job(tmp_path / path.name)
    assert again.runner.output == output and again.config == _with_inputs(job.config, pkg)


def _with_inputs(config, pkg):
    import dataclasses

    return dataclasses.replace(config, **{k: v[0] for k, v in pkg.inputs.items() if len(v) == 1})


def test_package_holds_code_weights_inputs_and_the_resolved_job(tmp_path, small_image, monkeypatch):
    from runner.config import load_job
    from runner.package import build_package

    monkeypatch.chdir(small_image.parent)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(
        "task: upscale\noutput: runs/x\nmodel: {kind: reference}\nimage: bird.png\nscale: 2\n"
        "tracking: {comet: off}\nsweep: {seed: seeds.json}\n"
    )
    (tmp_path / "seeds.json").write_text("[4, 5]")
    job = load_job(job_file)
    folder = tmp_path / "pkg"
    folder.mkdir()
    pkg = build_package(
        job, folder, job_name="job.yaml", output="s3://b/runs/x", base=tmp_path, inputs_on_cluster=False
    )
    assert pkg.weights == ["taef2", "lpips", "reference"]
    assert (folder / "models/reference/reference.json").is_file()
    assert not (folder / "models/reference/samples.png").exists()  # documentation, not weights
    assert (folder / "inputs/image/bird.png").read_bytes() == small_image.read_bytes()
    assert (folder / "runner/cli.py").is_file() and not list(folder.rglob("__pycache__"))
    assert not (folder / "runs").exists() and not (folder / "tests").exists()
    monkeypatch.chdir(folder)  # as on the cluster: the package is the working directory
    again = load_job(folder / "job.yaml")
    assert again.config.image == "inputs/image/bird.png" and again.runner.output == "s3://b/runs/x"
    assert again.runner.sweep == {"seed": [4, 5]} and again.runner.tracking.comet == "off"
    assert again.config.scale == job.config.scale and again.config.tiling == job.config.tiling
    flux = load_job(
        job_file, ["model={kind: flux, path: /data/FLUX.1-dev}", "sweep={}", "image=/data/in.png"]
    )
    other = tmp_path / "pkg2"
    other.mkdir()
    pkg = build_package(
        flux, other, job_name="j.yaml", output="/results/x", base=tmp_path, inputs_on_cluster=True
    )
    assert pkg.weights == ["taef2", "lpips"] and pkg.inputs == {} and not (other / "inputs").exists()
    assert pkg.size() < 8 * 2**20  # code and TAEF2; no reference model, no runs/, no .git


def test_rays_large_file_warning_is_dropped_only_for_the_shipped_weights(tmp_path):
    import logging

    from runner.jobs import _BuiltInWeightsFilter

    quiet = _BuiltInWeightsFilter(tmp_path)

    def record(path):
        msg = f"File {path} is very large (11.38MiB). Consider adding this file to the 'excludes' list"
        return logging.LogRecord("ray", logging.WARNING, __file__, 1, msg, None, None)

    assert not quiet.filter(record(tmp_path / "models/reference/transformer/shard-1.safetensors"))
    assert quiet.filter(record(tmp_path / "inputs/image/huge.png"))


def test_swept_inputs_are_each_uploaded(tmp_path, small_image):
    from runner.config import load_job
    from runner.package import build_package

    other = tmp_path / "other.png"
    other.write_bytes(small_image.read_bytes())
    job_file = tmp_path / "job.yaml"
    job_file.write_text(
        f"task: upscale\noutput: runs/x\nmodel: {{kind: random}}\nimage: {small_image}\nscale: 2\n"
        f"sweep: {{image: [{small_image}, {other}]}}\n"
    )
    folder = tmp_path / "pkg"
    folder.mkdir()
    pkg = build_package(
        load_job(job_file),
        folder,
        job_name="job.yaml",
        output="s3://b/x",
        base=tmp_path,
        inputs_on_cluster=False,
    )
    swept = ["inputs/image/0-bird.png", "inputs/image/1-other.png"]
    assert pkg.inputs == {"image": ["inputs/image/bird.png", *swept]}
    assert load_job(folder / "job.yaml").runner.sweep == {"image": swept}
    assert all((folder / p).read_bytes() == small_image.read_bytes() for p in swept)


def test_a_nested_input_field_is_uploaded_and_renamed(tmp_path, small_image):
    """outputs.reference is an input (registry: dotted field names): it travels with the job and the
    packaged job file names the copy."""
    from runner.config import load_job
    from runner.package import build_package

    job_file = tmp_path / "job.yaml"
    job_file.write_text(
        f"task: upscale\noutput: runs/x\nmodel: {{kind: random}}\nimage: {small_image}\nscale: 2\n"
        f"outputs: {{reference: {small_image}}}\n"
    )
    folder = tmp_path / "pkg"
    folder.mkdir()
    pkg = build_package(
        load_job(job_file),
        folder,
        job_name="job.yaml",
        output="s3://b/x",
        base=tmp_path,
        inputs_on_cluster=False,
    )
    assert pkg.inputs == {
        "image": ["inputs/image/bird.png"],
        "outputs.reference": ["inputs/outputs.reference/bird.png"],
    }
    again = load_job(folder / "job.yaml")
    assert again.config.outputs.reference == "inputs/outputs.reference/bird.png"
    assert (folder / again.config.outputs.reference).read_bytes() == small_image.read_bytes()


def test_a_sweep_announces_each_job_and_continues_past_a_failed_one(ray_cluster, small_image, tmp_path):
    """Like Tune trials: job 0's model cannot load (its VAE folder does not exist), the sweep records
    that in sweep.json and runs job 1; it then fails naming job 0 (`tessera run` exits 1 with it)."""
    import io

    from runner.run import SweepFailed, run_job
    from runner.sweep import folder_name

    out, console = tmp_path / "sweep", io.StringIO()
    missing = tmp_path / "no-vae"
    overrides = [
        f"image={small_image}",
        f"output={out}",
        "pool.name=cli-sweep",
        "steps=2",
        "tiling.tile=64",
        "tiling.overlap=16",
        f"sweep={{model.vae: [{missing}, taef2]}}",
    ]
    try:
        with pytest.raises(SweepFailed) as err:
            run_job(EXAMPLE, overrides, stream=console)
    finally:
        kill_pool("cli-sweep", 1)
    lines = [line for line in console.getvalue().splitlines() if line.startswith("[sweep]")]
    first, second = out / folder_name(0, {"model.vae": str(missing)}), out / "001-vae=taef2"
    assert lines[0] == f"[sweep] job 1/2: model.vae={missing} -> {first}"
    assert lines[1].startswith("[sweep] job 1/2 failed (OSError: ") and lines[1].endswith("; continuing")
    assert lines[2] == f"[sweep] job 2/2: model.vae=taef2 -> {second}"
    entries = json.loads((out / "sweep.json").read_text())
    assert [e["status"] for e in entries] == ["failed", "succeeded"]
    assert str(missing) in entries[0]["error"] and (second / "result.png").is_file()
    assert (
        entries[0]["output"] == str(first)
        and json.loads((first / "job.json").read_text())["status"] == "failed"
    )
    assert str(err.value).startswith("1 of 2 sweep jobs failed (000-vae=") and "\n" not in str(err.value)
