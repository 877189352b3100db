"""Results storage (runner/storage.py): locations parsed without a network, a staging folder kept in
sync with a file:// location (pyarrow's LocalFileSystem under a SubTreeFileSystem), and an
unreachable object store refused with its URI named."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from runner.storage import StagedOutput, StorageError, check_reachable, parse_location, pull, staging_folder

pytestmark = pytest.mark.cpu


def test_locations_parse_without_a_network(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_location("runs/x").uri == (tmp_path / "runs/x").as_uri()
    assert parse_location("/data/out").path == "/data/out"
    loc = parse_location("s3://bucket/tessera?endpoint_override=minio:9000")
    assert (loc.scheme, loc.path, loc.name) == ("s3", "bucket/tessera", "tessera")
    assert loc.join("runs/demo").uri == "s3://bucket/tessera/runs/demo?endpoint_override=minio:9000"
    assert loc.join("runs/demo").path == "bucket/tessera/runs/demo"
    assert parse_location("file:///shared/runs").path == "/shared/runs"
    for bad, match in [
        ("ftp://host/x", "scheme 'ftp' is not one of"),
        ("s3:///key", "names no bucket"),
        ("file://host/x", "absolute path"),
        ("s3://bucket/a/../b", "may not contain '..'"),
    ]:
        with pytest.raises(StorageError, match=match):
            parse_location(bad)


def test_staged_output_pulls_syncs_while_running_and_pushes_at_the_end(tmp_path):
    store = tmp_path / "store"
    (store / "phase1").mkdir(parents=True)
    (store / "phase1/checkpoint.safetensors").write_bytes(b"previous run")
    loc = parse_location(store.as_uri())
    stale = staging_folder(loc, tmp_path / "staging") / "leftover.txt"
    stale.parent.mkdir(parents=True)
    stale.write_text("from an older run on this node")
    out = io.StringIO()
    with StagedOutput(loc, root=tmp_path / "staging", interval_s=0.1, stream=out) as staged:
        assert staged.folder == stale.parent
        # the previous run's files are here to resume from; this node's leftovers are gone
        assert (staged.folder / "phase1/checkpoint.safetensors").read_bytes() == b"previous run"
        assert not stale.exists()
        (staged.folder / "phase2").mkdir()
        (staged.folder / "phase2/checkpoint.safetensors").write_bytes(b"new checkpoint")
        (staged.folder / "phase2/.checkpoint.safetensors.tmp").write_bytes(b"half a file")
        deadline = time.monotonic() + 10
        while not (store / "phase2/checkpoint.safetensors").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        # synced while the job still runs, so a lost node keeps its checkpoints
        assert (store / "phase2/checkpoint.safetensors").read_bytes() == b"new checkpoint"
        (staged.folder / "result.png").write_bytes(b"final")
        (staged.folder / "phase2/checkpoint.safetensors").write_bytes(b"rewritten checkpoint")
    assert (store / "result.png").read_bytes() == b"final"
    assert (store / "phase2/checkpoint.safetensors").read_bytes() == b"rewritten checkpoint"
    assert not (store / "phase2/.checkpoint.safetensors.tmp").exists()
    assert not (store / "leftover.txt").exists()
    assert "pulled 1 files" in out.getvalue()
    # the pulled file was not sent back: result.png and phase2's checkpoint, the latter twice
    assert staged.uploads == 3
    assert sorted(pull(loc, tmp_path / "back")) == [
        "phase1/checkpoint.safetensors",
        "phase2/checkpoint.safetensors",
        "result.png",
    ]
    assert (tmp_path / "back/result.png").read_bytes() == b"final"


def test_a_failed_final_copy_names_the_staging_folder(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    loc = parse_location(store.as_uri())
    with pytest.raises(StorageError, match="they are in .*staging"):
        with StagedOutput(loc, root=tmp_path / "staging", interval_s=60) as staged:
            (staged.folder / "result.png").write_bytes(b"x")
            store.rmdir()
            store.write_text("a file where the folder was")  # the copy cannot create result.png
    assert (staged.folder / "result.png").read_bytes() == b"x"  # nothing computed is lost


def test_unreachable_object_store_is_refused_with_its_uri():
    """No network here: the S3 client fails after its own retries (about 6 s measured)."""
    loc = parse_location("s3://tessera-no-such-bucket/runs?region=us-east-1")
    start = time.monotonic()
    with pytest.raises(
        StorageError, match=r"storage 's3://tessera-no-such-bucket/runs\?region=us-east-1' is"
    ):
        check_reachable(loc)
    assert time.monotonic() - start < 60


def test_missing_local_location_is_empty_not_an_error(tmp_path):
    loc = parse_location(str(tmp_path / "not-yet"))
    assert check_reachable(loc) is False
    assert pull(loc, tmp_path / "dest") == []
    assert not Path(tmp_path / "dest").exists()


def test_a_new_location_is_created_with_its_folders(tmp_path):
    loc = parse_location((tmp_path / "store/runs/demo").as_uri())
    with StagedOutput(loc, root=tmp_path / "staging", interval_s=60) as staged:
        (staged.folder / "result.png").write_bytes(b"top level")
        (staged.folder / "phase1").mkdir()
        (staged.folder / "phase1/result.png").write_bytes(b"nested")
    assert (tmp_path / "store/runs/demo/result.png").read_bytes() == b"top level"
    assert (tmp_path / "store/runs/demo/phase1/result.png").read_bytes() == b"nested"
