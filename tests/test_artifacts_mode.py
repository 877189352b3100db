"""Job files are created with the mode a plain open() gives them (0666 less the umask), not the 0600
of a temporary file: results on a shared volume must be readable by the people they are for."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch

from runner.artifacts import write_json, write_png

pytestmark = pytest.mark.cpu


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_written_files_follow_the_umask_not_0600(tmp_path, umask_022):
    write_png(tmp_path / "result.png", np.zeros((4, 4, 3), dtype=np.uint8))
    write_json(tmp_path / "job.json", {"status": "succeeded"})
    write_png(tmp_path / "again.png", torch.zeros(3, 4, 4))
    write_png(tmp_path / "again.png", torch.ones(3, 4, 4))  # replaced: still the umask's mode
    for name in ("result.png", "job.json", "again.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.png", "job.json", "result.png"]
