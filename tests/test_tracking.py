"""The tracker (runner/tracking.py): one global step axis per run, a run id on every metrics line,
Comet's end-of-job artifacts and tags (offline archive), online mode falling back to offline without
a network, and a clear message when comet_ml is missing."""

from __future__ import annotations

import json
import sys
import time
import zipfile

import numpy as np
import pytest
from PIL import Image

from runner.config import TrackingConfig
from runner.tracking import GlobalSteps, Tracker, TrackingUnavailable, tags

pytestmark = pytest.mark.cpu

PARAMS = {"task": "upscale", "model": {"kind": "flux", "path": "/data/FLUX.1-dev/"}, "pool": {"name": "gpus"}}


def test_global_steps_continue_across_phases():
    steps = GlobalSteps()
    # phase 1 runs schedule steps 10..12, phase 2 steps 11..12, phase 3 repeats step 12 only:
    # each phase starts right after the previous one's last step
    task = [10, 11, 12, 11, 12, 12]
    assert [steps(s, {"sigma"}) for s in task] == [10, 11, 12, 13, 14, 15]
    # two groups of metrics at one training step share it; a gap in the task's steps is kept
    train = GlobalSteps()
    assert [train(s, keys) for s, keys in [(50, {"loss"}), (50, {"val"}), (100, {"loss"})]] == [50, 50, 100]


def test_metrics_lines_carry_the_run_id_and_global_steps(tmp_path):
    tracker = Tracker(tmp_path, TrackingConfig(), PARAMS, name="t")
    for step in (3, 4, 3, 4):  # two phases of two steps
        tracker.log({"sigma": 0.5, "views": 12}, step=step)
    tracker.end()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [3, 4, 5, 6]
    assert [line["task_step"] for line in lines] == [3, 4, 3, 4]
    assert {line["run_id"] for line in lines} == {tracker.run_id}
    assert Tracker(tmp_path, TrackingConfig(), PARAMS, name="t").run_id != tracker.run_id


def test_tags_name_task_model_and_pool():
    assert tags(PARAMS) == ["task:upscale", "model:flux:FLUX.1-dev", "pool:gpus"]
    assert tags({"task": "train_reference"}) == ["task:train_reference"]


def _messages(folder):
    (archive,) = folder.glob("*.zip")
    with zipfile.ZipFile(archive) as z:
        experiment = json.loads(z.read("experiment.json"))
        messages = [json.loads(line) for line in z.read("messages.json").decode().splitlines()]
    return experiment, messages


def _finished_job(tmp_path, tracker):
    tracker.log({"sigma": 0.9}, step=0)
    Image.new("RGB", (8, 8)).save(tmp_path / "result.png")
    Image.new("RGB", (16, 8)).save(tmp_path / "comparison.png")
    (tmp_path / "job.json").write_text(json.dumps({"timings": {"total_s": 12.5, "evaluate_s": 9.0}}))
    tracker.end()


def test_comet_offline_gets_images_job_json_timings_and_tags(tmp_path):
    tracker = Tracker(tmp_path, TrackingConfig(comet="offline"), PARAMS, name="upscale:x")
    _finished_job(tmp_path, tracker)
    experiment, messages = _messages(tmp_path / "comet")
    assert sorted(experiment["tags"]) == ["model:flux:FLUX.1-dev", "pool:gpus", "task:upscale"]
    uploads = {
        m["payload"]["additional_params"].get("figName") or m["payload"]["additional_params"].get("fileName")
        for m in messages
        if m["type"] == "file_upload"
    }
    assert uploads == {"result.png", "comparison.png", "job.json"}
    others = {m["payload"]["key"]: m["payload"]["value"] for m in messages if m["type"] == "log_other"}
    assert others["timing.total_s"] == 12.5 and others["tessera_run_id"] == tracker.run_id
    assert tracker.fallbacks == []


def test_comet_online_without_network_falls_back_to_offline(tmp_path, monkeypatch):
    """This machine has no route to comet.com: the run logs offline at once and records why."""
    monkeypatch.setenv("COMET_API_KEY", "not-a-real-key")
    start = time.monotonic()
    tracker = Tracker(tmp_path, TrackingConfig(comet="online"), PARAMS, name="upscale:x")
    assert time.monotonic() - start < 15
    assert [f["what"] for f in tracker.fallbacks] == ["comet offline"]
    assert "www.comet.com:443 is unreachable" in tracker.fallbacks[0]["reason"]
    _finished_job(tmp_path, tracker)
    _, messages = _messages(tmp_path / "comet")  # nothing dropped: the metric is in the archive
    assert any(
        m["type"] == "metric_msg" and m["payload"]["metric"]["metricName"] == "sigma" for m in messages
    )


def test_online_needs_a_key_and_comet_needs_the_extra(tmp_path, monkeypatch):
    monkeypatch.delenv("COMET_API_KEY", raising=False)
    with pytest.raises(TrackingUnavailable, match="needs COMET_API_KEY"):
        Tracker(tmp_path, TrackingConfig(comet="online"), PARAMS, name="x")


def test_the_job_record_gets_the_run_id_and_the_trackers_fallback(tmp_path, monkeypatch):
    import io

    from runner.context import JobArtifacts
    from runner.summary import finish

    monkeypatch.setenv("COMET_API_KEY", "not-a-real-key")
    tracker = Tracker(tmp_path, TrackingConfig(comet="online"), PARAMS, name="upscale:x")
    out = io.StringIO()
    arts = JobArtifacts(tmp_path, tracker, stream=out)
    arts.save_image("result.png", np.zeros((8, 8, 3), dtype=np.uint8))
    tracker.log({"sigma": 0.5}, step=0)
    record = {
        "task": "upscale",
        "status": "succeeded",
        "timings": {"total_s": 3.0},
        "pool": {"views": 30, "evaluate_wall_s": 2.0},
        "fallbacks": [{"what": "input crop", "reason": "r"}],
    }
    finish(record, arts)
    tracker.end()
    assert record["run_id"] == tracker.run_id
    assert [f["what"] for f in record["fallbacks"]] == ["input crop", "comet offline"]
    (archive,) = [a for a in record["artifacts"] if a.startswith("comet/")]  # the offline archive
    assert archive.endswith(".zip")
    assert [a for a in record["artifacts"] if a != archive] == ["job.json", "metrics.jsonl", "result.png"]
    assert record["source"]["version"].startswith("0.") and record["finished"]
    assert out.getvalue().splitlines()[-4:] == [
        "[summary] upscale succeeded in 0:00:03 (3.0 s)",
        "[summary] 30 views in 2.0 s of sampling: 15.00 views/s",
        f"[summary] output {tmp_path}: result.png, 3 more files",
        "[summary] fallbacks: input crop x1, comet offline x1",
    ]


def _site_without_comet(folder):
    """This environment's site-packages as links, every entry but comet_ml's: with `python -S` and
    this folder on PYTHONPATH, Python's import system finds everything installed here but Comet."""
    import sysconfig
    from pathlib import Path

    site = Path(sysconfig.get_paths()["purelib"])
    folder.mkdir()
    for entry in site.iterdir():
        if not entry.name.startswith(("comet_ml", "__editable__")) and entry.suffix != ".pth":
            (folder / entry.name).symlink_to(entry)
    return folder


def test_tessera_run_without_the_comet_extra_says_how_to_install_it(tmp_path, assets):
    """A job with tracking.comet=offline where comet_ml is not installed: one line naming the setting
    and the extra, exit code 2, before any work (no output folder, no Ray)."""
    import os
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")},
        "PYTHONPATH": os.pathsep.join([str(repo), str(_site_without_comet(tmp_path / "site"))]),
    }
    python = [sys.executable, "-S"]
    probe = subprocess.run([*python, "-c", "import comet_ml"], env=env, capture_output=True, text=True)
    assert "ModuleNotFoundError: No module named 'comet_ml'" in probe.stderr  # the extra is missing
    out = tmp_path / "out"
    job = [
        "run",
        str(repo / "clusters/examples/tiny_tiled_img2img.yaml"),
        f"image={assets / 'images/eval/set5/bird.png'}",
        f"output={out}",
    ]
    proc = subprocess.run(
        [*python, "-m", "runner", *job, "tracking.comet=offline"],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [
        "error: tracking.comet=offline needs comet_ml, which is not installed here: "
        "pip install 'tessera[comet]' (or set tracking.comet=off)"
    ]
    assert not out.exists()
