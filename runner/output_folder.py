"""A job's output folder across attempts: earlier records are kept, other settings are refused.

Running a job again in its folder is how it resumes, so a folder holds one job, attempt after
attempt. Each attempt's record (job.json, metrics.jsonl) moves to `attempts/NNN/` when the next one
starts, so a re-run never loses what an earlier one measured; the current job.json lists them.

A job whose settings differ from the folder's last job (another seed, other steps, another model)
is refused before any work: its files would land beside the old job's (a `phase2/` left from a
two-phase job beside a one-phase result), and its record would describe neither. `--overwrite`
replaces the old job: everything it wrote moves to `attempts/NNN/files/` (nothing is deleted), and
the new one starts fresh. Settings are compared on what changes numbers (runner/fingerprint.py):
artifact switches (which images to write) and the runner's own keys do not count.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.config import JobConfigError

ATTEMPTS = "attempts"
RECORD_FILES = ("job.json", "metrics.jsonl")


@dataclass(frozen=True)
class Attempt:
    """This attempt's place in its folder: its number (1 = the folder's first), a summary of the
    earlier attempts, and where --overwrite moved the files of the job it replaced (or None)."""

    number: int
    previous: list[dict[str, Any]]
    replaced: str | None


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def differences(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ, as "key: old -> new"."""
    a, b = _flatten(before), _flatten(after)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def last_record(folder: Path) -> dict[str, Any] | None:
    path = folder / "job.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise JobConfigError(
            f"output {str(folder)!r} holds an unreadable job.json ({err}); move it away"
        ) from None


def _running_here(record: Mapping[str, Any]) -> bool:
    """Whether the record is of a job still running on this machine (its driver process is alive)."""
    if record.get("status") != "running" or record.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(record.get("pid", 0)), 0)
    except (ProcessLookupError, ValueError, OverflowError):
        return False
    except PermissionError:  # alive, another user's
        return True
    return int(record.get("pid", 0)) > 0


def check_output(
    folder: Path,
    settings: Mapping[str, Any],
    settings_of: Callable[[Mapping[str, Any]], Mapping[str, Any]],
    *,
    overwrite: bool,
) -> None:
    """Refuse a folder in use by a running job, or whose last job had other settings (unless
    overwrite). settings_of(a record's config) gives that job's settings as `settings` were made."""
    last = last_record(folder)
    if last is None:
        return
    if _running_here(last):
        raise JobConfigError(
            f"output {str(folder)!r} is in use: a job started {last.get('started')} is still running "
            f"(pid {last.get('pid')}); wait for it or choose another output"
        )
    if overwrite:
        return
    changed = differences(settings_of(last.get("config") or {}), settings)
    if changed:
        shown = "; ".join(changed[:6]) + (f"; and {len(changed) - 6} more" if len(changed) > 6 else "")
        raise JobConfigError(
            f"output {str(folder)!r} holds a job with other settings ({shown}). Choose another output, "
            "or pass --overwrite to replace that job (its files move to attempts/, nothing is deleted)"
        )


def _summary(number: int, record: Mapping[str, Any]) -> dict[str, Any]:
    error = record.get("error") or {}
    return {
        "attempt": number,
        "status": record.get("status"),
        "started": record.get("started"),
        "finished": record.get("finished"),
        "error": f"{error.get('type')}: {error.get('message')}" if error else None,
        "record": f"{ATTEMPTS}/{number:03d}/job.json",
    }


def open_output(folder: Path, *, overwrite: bool) -> Attempt:
    """Make the folder ready for a new attempt: the last attempt's record moves to attempts/NNN/ and,
    with overwrite, every other file of its job to attempts/NNN/files/."""
    folder.mkdir(parents=True, exist_ok=True)
    root = folder / ATTEMPTS
    numbers = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []
    last = last_record(folder)
    replaced = None
    if last is not None:
        number = (numbers[-1] if numbers else 0) + 1
        keep = root / f"{number:03d}"
        keep.mkdir(parents=True)
        for name in RECORD_FILES:
            if (folder / name).exists():
                os.replace(folder / name, keep / name)
        if overwrite:
            files = keep / "files"
            files.mkdir()
            for entry in sorted(folder.iterdir()):
                if entry.name != ATTEMPTS:
                    os.replace(entry, files / entry.name)
            replaced = str(files.relative_to(folder))
        numbers.append(number)
    previous = []
    for n in numbers:
        path = root / f"{n:03d}" / "job.json"
        record = json.loads(path.read_text()) if path.is_file() else {}
        previous.append(_summary(n, record))
    return Attempt(len(numbers) + 1, previous, replaced)
