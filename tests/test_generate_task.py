"""task: generate on the reference model, and the `attention:` block serving a students bundle:
deterministic per seed, the same in process and on a local Ray pool, fail closed, counted."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

from core.attention.config import StudentConfig
from core.attention.student import build_student
from core.models.loading import ModelSpec
from runner.context import JobArtifacts, JobContext, LocalModelPool
from runner.distill.bundle import LayerEntry, StudentsBundle, save_bundle
from runner.models import load_model
from runner.run import run_job
from tasks.distill_attention import AttentionConfig
from tasks.generate import run
from tasks.generate_config import GenerateConfig

pytestmark = pytest.mark.cpu
REFERENCE = ModelSpec(kind="reference")
LAYERS = ["double:0", "double:1", "single:0", "single:1", "single:2", "single:3"]


@pytest.fixture(scope="module")
def model():
    return load_model(REFERENCE, "cpu")


def make_bundle(folder, ready: set[str], *, nan: set[str] = frozenset()):
    """Seeded untrained students for every reference layer; `ready` may serve; `nan` hold NaN weights."""
    layers = {}
    for i, key in enumerate(LAYERS):
        student = build_student(StudentConfig(heads=6, head_dim=64), seed=i)
        if key in nan:
            with torch.no_grad():
                for p in student.phi_q.parameters():
                    p.fill_(float("nan"))
        layers[key] = LayerEntry.of(key, student, ready=key in ready, may_serve=key in ready)
    save_bundle(folder, StudentsBundle(layers=layers, meta={"made_by": "test"}))
    return str(folder)


def generate(model, out, *, attention=None, seeds=(0,), size=(64, 64)):
    pool = LocalModelPool(model)
    if attention is not None:
        pool.serve_students(attention)
    ctx = JobContext(JobArtifacts(out, stream=open(os.devnull, "w")), pool)
    cfg = GenerateConfig(model=REFERENCE, size=size, seeds=seeds, steps=2, attention=attention)
    return run(cfg, ctx), pool


def test_each_seed_gives_its_own_image_whatever_else_runs(model, tmp_path):
    both, _ = generate(model, tmp_path / "a", seeds=(3, 5))
    alone, _ = generate(model, tmp_path / "b", seeds=(5,))
    assert torch.equal(both.images[5], alone.images[5])
    assert not torch.equal(both.images[3], both.images[5])
    assert (tmp_path / "a" / "seed_3.png").is_file() and (tmp_path / "a" / "result.png").is_file()


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"size must be \[height, width\], multiples of 16"):
        GenerateConfig(size=(100, 64))
    with pytest.raises(ValueError, match="seeds must be distinct"):
        GenerateConfig(seeds=(1, 1))
    with pytest.raises(ValueError, match="attention.layers must be 'ready' or a layer set"):
        AttentionConfig(students="x", layers="single:zz")
    with pytest.raises(ValueError, match="attention.min_image_tokens must be >= 0, got -1"):
        AttentionConfig(students="x", min_image_tokens=-1)
    with pytest.raises(ValueError, match="min_image_tokens applies to students routed without a controller"):
        AttentionConfig(students="x", controller="c.pt", min_image_tokens=4096)


def test_students_serve_only_their_ready_layers(model, tmp_path):
    teacher, _ = generate(model, tmp_path / "t")
    none_ready = make_bundle(tmp_path / "none", set())
    same, pool = generate(model, tmp_path / "n", attention=AttentionConfig(students=none_ready))
    assert torch.equal(same.image, teacher.image)  # nothing ready: the teacher, bit for bit
    assert pool.summary()["attention"]["routed"] == []

    one = make_bundle(tmp_path / "one", {"single:3"})
    routed, pool = generate(model, tmp_path / "o", attention=AttentionConfig(students=one))
    record = pool.summary()["attention"]
    assert record["routed"] == ["single:3"]
    assert record["counters"]["layers"]["single:3"]["student"] == 2  # 2 steps, one view each
    assert set(record["counters"]["layers"]) == {"single:3"}  # no other layer was even routed
    assert record["served_calls"] == 2 and record["fallback_calls"] == 0
    assert record["not_routed"]["single:0"] == "not ready"
    assert not torch.equal(routed.image, teacher.image)

    restricted, pool = generate(
        model, tmp_path / "r", attention=AttentionConfig(students=one, layers="double")
    )
    assert torch.equal(restricted.image, teacher.image)  # single:3 is ready but not selected
    assert pool.summary()["attention"]["not_routed"]["single:3"] == "not in attention.layers"


def test_non_finite_students_fail_closed_and_are_counted(model, tmp_path):
    teacher, _ = generate(model, tmp_path / "t")
    bad = make_bundle(tmp_path / "nan", {"single:1", "single:2"}, nan={"single:1", "single:2"})
    out, pool = generate(model, tmp_path / "n", attention=AttentionConfig(students=bad))
    record = pool.summary()["attention"]
    assert torch.equal(out.image, teacher.image)
    assert record["served_calls"] == 0 and record["fallback_calls"] == 4
    assert record["counters"]["layers"]["single:1"]["nonfinite"] == 2


def test_generate_on_a_ray_pool_equals_in_process_and_records_attention(ray_cluster, model, tmp_path):
    bundle = make_bundle(tmp_path / "students", {"double:1"})
    attention = AttentionConfig(students=bundle)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' thread count (docs/runner.md: equality)
    try:
        local, _ = generate(model, tmp_path / "local", attention=attention, seeds=(0, 1))
    finally:
        torch.set_num_threads(threads)
    job = {
        "task": "generate",
        "output": str(tmp_path / "pool"),
        "pool": {"name": "gen", "workers": 2, "device": "cpu", "cpus_per_worker": 1},
        "model": {"kind": "reference"},
        "size": [64, 64],
        "seeds": [0, 1],
        "steps": 2,
        "attention": {"students": bundle},
    }
    path = tmp_path / "gen.yaml"
    path.write_text(yaml.safe_dump(job))
    [outcome] = run_job(path, stream=open(os.devnull, "w"))
    for seed in (0, 1):
        assert torch.equal(outcome.result.images[seed], local.images[seed])
    record = json.loads((tmp_path / "pool" / "job.json").read_text())["attention"]
    assert record["routed"] == ["double:1"]
    assert record["served_calls"] == 4  # 2 seeds x 2 steps
    from runner.pool.lifecycle import stop_workers

    stop_workers("gen")
