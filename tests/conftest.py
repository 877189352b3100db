"""Test environment: offline, no Ray token auth, no Comet telemetry; one local Ray per session."""

from __future__ import annotations

import os

# Before anything imports ray, diffusers, transformers or comet_ml (platform-notes.md §10).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("COMET_ERROR_TRACKING_ENABLE", "false")
os.environ.setdefault("COMET_DISABLE_AUTO_LOGGING", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.pop("RAY_ADDRESS", None)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("TESSERA_ASSETS", REPO.parent / "shared" / "assets"))


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords or "multi_gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def assets() -> Path:
    if not ASSETS.is_dir():
        pytest.skip(f"shared assets not found at {ASSETS} (set TESSERA_ASSETS)")
    return ASSETS


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session, with 2 fake GPUs to test scheduling."""
    import ray

    from runner.ray_init import REPO_ROOT

    if not ray.is_initialized():
        ray.init(
            namespace="tessera",
            num_cpus=4,
            num_gpus=2,
            include_dashboard=False,
            object_store_memory=300 * 1024 * 1024,
            runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}},
        )
    yield ray
    ray.shutdown()
