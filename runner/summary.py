"""The end of a job: the fields job.json gets last, and the summary the console ends with.

`finish(record, arts)` runs once per job, after the task (failed or not) and before job.json is
written. It records the finish time, the source (version and git commit: of the checkout, or, in a
submitted job's package, of the checkout it was built from), the run id its metrics carry, every
artifact under the output folder and the tracker's fallbacks; then it prints the summary: status
and time, views per second of the model pool, the output folder's main files and the fallbacks.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

from runner.ray_init import REPO_ROOT

SOURCE_FILE = "source.json"  # written into a submitted job's package (runner/package.py)
MAIN_FILES = ("result.png", "comparison.png", "bicubic.png", "samples.png", "training.json", "sweep.json")


def version() -> str:
    try:
        return importlib.metadata.version("tessera")
    except importlib.metadata.PackageNotFoundError:  # a checkout that is not installed, or a package
        pyproject = REPO_ROOT / "pyproject.toml"
        found = (
            re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.M)
            if pyproject.is_file()
            else None
        )
        return found.group(1) if found else "unknown"


def source(root: Path = REPO_ROOT) -> dict[str, Any]:
    """{"version", "commit", "dirty", "origin"}: origin "git" (a checkout), "package" (a submitted
    job's package, with the commit of the checkout it was built from) or None (neither, or no git)."""
    info: dict[str, Any] = {"version": version(), "commit": None, "dirty": None, "origin": None}
    if (root / ".git").exists():
        try:
            commit = _git(root, "rev-parse", "HEAD")
            dirty = bool(_git(root, "status", "--porcelain", "--untracked-files=no"))
        except (OSError, subprocess.CalledProcessError):
            return info  # git missing or the folder is no repository: no commit to record
        return {**info, "commit": commit, "dirty": dirty, "origin": "git"}
    if (root / SOURCE_FILE).is_file():
        return {**info, **json.loads((root / SOURCE_FILE).read_text()), "origin": "package"}
    return info


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, check=True, timeout=10
    ).stdout.strip()


def version_line() -> str:
    info = source()
    if info["commit"] is None:
        return f"tessera {info['version']}"
    return f"tessera {info['version']} (git {info['commit'][:10]}{', modified' if info['dirty'] else ''})"


def artifacts(output: Path) -> list[str]:
    """Every file under the output folder, relative, sorted (temporary dot-files left out)."""
    out = []
    for path in output.rglob("*"):
        rel = path.relative_to(output)
        if path.is_file() and not any(p.startswith(".") for p in rel.parts):
            out.append(rel.as_posix())
    return sorted(out)


def finish(record: dict[str, Any], arts, stream=None) -> None:
    """Complete the record (see the module docstring) and print the job's summary."""
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    record["source"] = source()
    tracker = arts.tracker
    if tracker is not None:
        record["run_id"] = tracker.run_id
        record["fallbacks"] = [*record.get("fallbacks", []), *tracker.fallbacks]
    names = artifacts(arts.output)
    record["artifacts"] = sorted({*names, "job.json"})
    for line in summary_lines(record, arts.output):
        print(line, file=stream or arts.stream, flush=True)


def summary_lines(record: dict[str, Any], output: Path) -> list[str]:
    timings = record.get("timings", {})
    total = timings.get("total_s", 0.0)
    lines = [
        f"[summary] {record.get('task')} {record.get('status', '?')} in {_duration(total)} ({total:.1f} s)"
    ]
    pool = record.get("pool") or {}
    views, wall = pool.get("views"), pool.get("evaluate_wall_s")
    if views and wall:
        lines.append(f"[summary] {views} views in {wall:.1f} s of sampling: {views / wall:.2f} views/s")
    names = record.get("artifacts", [])
    main = [n for n in MAIN_FILES if n in names]
    rest = len(names) - len(main)
    lines.append(f"[summary] output {output}: {', '.join([*main, f'{rest} more files'])}")
    fallbacks = Counter(f.get("what", "?") for f in record.get("fallbacks", []))
    text = ", ".join(f"{what} x{n}" for what, n in fallbacks.items()) or "none"
    lines.append(f"[summary] fallbacks: {text}")
    if record.get("error"):
        lines.append(f"[summary] error: {record['error'].get('type')}: {record['error'].get('message')}")
    return lines


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def write_source(folder: Path) -> None:
    """The source of this checkout, for a package built from it (no .git travels with a job)."""
    info = source()
    (folder / SOURCE_FILE).write_text(json.dumps({"commit": info["commit"], "dirty": info["dirty"]}) + "\n")
