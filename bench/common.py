"""Shared pieces of the benchmarks: environment facts, timing statistics, result files."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from runner.timing import stats  # noqa: F401  (the benchmarks' timing statistics)

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "not installed"

    gpus = []
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": version("diffusers"),
        "ray": version("ray"),
        "gpus": gpus,
        "cpu_count": os.cpu_count(),
    }


def write_result(name: str, data: dict[str, Any]) -> Path:
    """bench/results/<name>.json, and a copy under $OUT when the device tool runs us."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2) + "\n"
    path = RESULTS / f"{name}.json"
    path.write_text(text)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{name}.json").write_text(text)
    return path
