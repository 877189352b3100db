"""Checks before any work starts: every input image decodes in full, and the job fits the budget.

A truncated PNG passes a header check (`Image.open` reads only the header) and fails much later,
after Ray and the model have started; decoding every input image here turns that into one clear
error naming the field and the file, with nothing started and nothing written.
"""

from __future__ import annotations

import zlib
from pathlib import Path

from PIL import Image

from runner.artifacts import IMAGE_SUFFIXES
from runner.config import Job, JobConfigError
from runner.estimate import PIXEL_BUDGET, Estimate
from runner.fingerprint import field_value


def image_files(path: Path) -> list[Path]:
    """The images a path names: itself, or every PNG/JPEG under a folder."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return [path] if path.suffix.lower() in IMAGE_SUFFIXES else []


def decode_fully(path: Path) -> None:
    """Raise OSError/ValueError unless the file is an image whose every byte decodes: verify() checks
    the chunk checksums of a PNG, load() decodes all pixel data (a truncated file fails there)."""
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        im.load()


def check_inputs(job: Job) -> int:
    """Decode every input image the config names (TaskEntry.inputs); returns how many were checked."""
    checked = 0
    for name in job.task.inputs:
        value = field_value(job.config, name)
        if not value:
            continue
        path = Path(value)
        if not path.exists():
            raise JobConfigError(f"{name} {value!r} does not exist")
        for image in image_files(path):
            try:
                decode_fully(image)
            except (OSError, ValueError, SyntaxError, zlib.error) as err:  # PIL's decoder errors
                raise JobConfigError(f"{name}: {str(image)!r} is damaged or not an image: {err}") from None
            checked += 1
    return checked


def estimate_job(job: Job) -> Estimate | None:
    estimate = job.task.estimate_fn()
    return None if estimate is None else estimate(job.config)


def check_budget(estimate: Estimate | None, *, allow_large: bool) -> None:
    if estimate is None or allow_large or estimate.pixels <= PIXEL_BUDGET:
        return
    raise JobConfigError(
        f"the job is far beyond the model's scale: {estimate.describe()}; that is above the pixel budget "
        f"of {PIXEL_BUDGET / 1e6:.1f} MP ({int(PIXEL_BUDGET**0.5)} x {int(PIXEL_BUDGET**0.5)} px). "
        "Lower scale or target, or pass --allow-large to run it anyway"
    )
