"""The students bundle: a round trip is exact, and every kind of damage is an error naming the file."""

from __future__ import annotations

import json

import pytest
import torch

from core.attention.config import StudentConfig
from core.attention.student import build_student
from runner.distill.bundle import BundleError, LayerEntry, StudentsBundle, load_bundle, save_bundle

pytestmark = pytest.mark.cpu
CONFIG = StudentConfig(heads=2, head_dim=16, features=64)


@pytest.fixture
def bundle(tmp_path):
    layers = {
        key: LayerEntry.of(
            key,
            build_student(CONFIG, seed=i),
            ready=i == 0,
            may_serve=i == 0,
            readiness={"ema": 0.01 * (i + 1), "updates": 10},
            losses={"total": 0.5, "cosine_distance": 0.02},
            updates=10 + i,
            group=i,
            worker=i % 2,
        )
        for i, key in enumerate(["double:0", "single:0"])
    }
    made = StudentsBundle(
        layers=layers,
        hyperparameters={"trainer": {"lr": 1e-3}},
        assignment={"groups": [["double:0"], ["single:0"]]},
    )
    save_bundle(tmp_path / "students", made)
    return tmp_path / "students", made


def test_round_trip_is_exact(bundle):
    folder, made = bundle
    loaded = load_bundle(folder)
    assert list(loaded.layers) == ["double:0", "single:0"]
    assert loaded.servable() == ("double:0",)
    assert loaded.hyperparameters == made.hyperparameters and loaded.assignment == made.assignment
    for key, entry in made.layers.items():
        got = loaded.layers[key]
        assert got.student == entry.student and got.updates == entry.updates and got.worker == entry.worker
        assert got.readiness == entry.readiness and got.losses == entry.losses
        a, b = entry.build().state_dict(), got.build().state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a if k != "_extra_state")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["layers"]["single:0"]["features"] == 64 and manifest["version"] == 1


def test_a_flipped_byte_names_the_file(bundle):
    folder, _ = bundle
    path = folder / "single_0.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"single_0\.safetensors' is damaged"):
        load_bundle(folder)


def test_a_missing_file_or_manifest_names_it(bundle):
    folder, _ = bundle
    (folder / "double_0.safetensors").unlink()
    with pytest.raises(BundleError, match=r"double_0\.safetensors' is missing"):
        load_bundle(folder)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match=r"manifest.json' is not valid JSON"):
        load_bundle(folder)
    (folder / "manifest.json").unlink()
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(folder)


def test_weights_of_another_shape_are_refused(bundle, tmp_path):
    folder, made = bundle
    other = LayerEntry.of(
        "single:0", build_student(StudentConfig(heads=2, head_dim=16, features=128), seed=0)
    )
    wrong = LayerEntry(key="single:0", student=CONFIG, weights=other.weights)
    save_bundle(tmp_path / "wrong", StudentsBundle(layers={"single:0": wrong}))
    with pytest.raises(BundleError, match="does not fit its student config"):
        load_bundle(tmp_path / "wrong")
