"""The environment the suite runs in satisfies pyproject.toml's requirements (so the bounds there,
e.g. transformers < 6, are the versions the tests cover), and loading a model through diffusers
does not fall back for want of accelerate (diffusers then warns and builds the model twice)."""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

pytestmark = pytest.mark.cpu
REPO = Path(__file__).resolve().parents[1]


def requirements(*extras: str) -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + [r for e in extras for r in project["optional-dependencies"][e]]
    return [r for r in map(Requirement, lines) if r.marker is None or r.marker.evaluate()]


def test_installed_versions_are_inside_the_declared_bounds():
    reqs = requirements("comet", "dev")
    names = {r.name for r in reqs}
    assert {"transformers", "accelerate", "diffusers", "comet-ml"} <= names
    outside = {
        r.name: importlib.metadata.version(r.name)
        for r in reqs
        if not r.specifier.contains(importlib.metadata.version(r.name), prereleases=True)
    }
    assert outside == {}
    transformers = next(r for r in reqs if r.name == "transformers")
    assert not transformers.specifier.contains("6.0.0")  # the next major is untested: excluded


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_loading_the_reference_model_does_not_warn_about_accelerate():
    from core.models.loading import ModelSpec
    from runner.models import load_model

    records, logger = _Records(), logging.getLogger("diffusers")
    logger.addHandler(records)
    try:
        model = load_model(ModelSpec(kind="reference"))
    finally:
        logger.removeHandler(records)
    assert model.meta.latent_channels == 32
    assert [m for m in records.messages if "accelerate" in m or "low_cpu_mem_usage" in m] == []
