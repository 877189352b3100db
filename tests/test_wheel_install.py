"""The built-in weights from a wheel install: the wheel carries them as data files, pip puts them
under the environment's share/tessera/models, and the runner finds them there with no checkout in
sight; TESSERA_MODELS points elsewhere, and a folder without them is named in the error.

The wheel is built from a copy of this tree (its code, pyproject.toml and models/) and installed,
without dependencies, into a fresh virtual environment whose only other entry is this
environment's site-packages (torch, diffusers, ...), on a plain path: no editable install of the
checkout is active there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.cpu, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
SHARD = "reference/transformer/diffusion_pytorch_model-00001-of-00004.safetensors"

PROBE = """
import json, sys
import runner.models as m
from core.models.loading import ModelSpec
from runner.perceptual import REPO_HEADS
from runner.summary import version
out = {"code": m.__file__, "models": str(m.MODELS), "heads": str(REPO_HEADS), "version": version()}
out["elsewhere"] = str(m.builtin_models_folder({"TESSERA_MODELS": sys.argv[1]}))
try:
    out["latent_channels"] = m.load_model(ModelSpec(kind="reference")).meta.latent_channels
except FileNotFoundError as err:
    out["error"] = str(err)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("core", "tasks", "runner", "models"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [
            *pip,
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(root / "dist"),
            str(src),
        ],
        check=True,
        cwd=root,
    )
    (wheel,) = (root / "dist").glob("tessera-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    data = "tessera-0.1.0.data/data/share/tessera/models/"
    assert f"{data}{SHARD}" in names and f"{data}taef2/taef2_encoder.pth" in names
    assert not any(n.endswith("samples.png") for n in names)  # documentation stays out
    venv = root / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--prefix", str(venv), str(wheel)], check=True
    )
    site = venv / Path(sysconfig.get_path("purelib")).relative_to(sys.prefix)
    (site / "base_env.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return venv


def probe(venv: Path, cwd: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TESSERA_MODELS")}
    proc = subprocess.run(
        [str(venv / "bin/python"), "-c", PROBE, str(cwd / "mine")],
        env={**env, **extra},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_wheel_install_finds_the_built_in_weights(env, tmp_path):
    found = probe(env, tmp_path)
    models = env / "share/tessera/models"
    assert Path(found["code"]).is_relative_to(env) and found["version"] == "0.1.0"
    assert found["models"] == str(models) and found["latent_channels"] == 32  # the reference model loaded
    assert found["heads"] == str(models / "lpips/v0.1/alex.pth")
    assert sha256(models / SHARD) == sha256(REPO / "models" / SHARD)
    assert found["elsewhere"] == str(tmp_path / "mine")  # TESSERA_MODELS comes first


def test_tessera_models_without_the_weights_is_named_in_the_error(env, tmp_path):
    (tmp_path / "empty").mkdir()
    missing = probe(env, tmp_path, TESSERA_MODELS=str(tmp_path / "empty"))
    assert missing["models"] == str(tmp_path / "empty")
    assert missing["error"].startswith(f"the built-in weights 'reference' are not in '{tmp_path / 'empty'}'")
    assert "$TESSERA_MODELS" in missing["error"] and "share/tessera/models" in missing["error"]
