"""Job arrays: one job file expands into many jobs over a true Cartesian product of values.

    sweep:
      seed: [0, 1, 2]
      model.prompt: prompts.json     # a JSON list of values, read from a file
      denoise: [[0.6, 0.4], [0.5, 0.3]]

gives 3 x |prompts| x 2 jobs; each runs with those values as overrides, writes to its own folder
`<output>/<index>-<key=value,...>` and records its coordinates. They share the worker pool.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any


def sweep_values(key: str, value: Any, base: Path) -> list[Any]:
    if isinstance(value, str) and value.endswith(".json"):
        path = Path(value) if Path(value).is_absolute() else base / value
        if not path.is_file():
            raise ValueError(f"sweep.{key}: values file {str(path)!r} does not exist")
        value = json.loads(path.read_text())
    if not isinstance(value, list) or not value:
        raise ValueError(f"sweep.{key} must be a non-empty list (or a .json file holding one), got {value!r}")
    return value


def expand(sweep: dict[str, Any], base: Path) -> list[dict[str, Any]]:
    """Every combination of the swept values, in row-major order of the keys as written."""
    if not sweep:
        return [{}]
    keys = list(sweep)
    lists = [sweep_values(k, sweep[k], base) for k in keys]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*lists)]


def override(key: str, value: Any) -> str:
    """A key=value dotlist entry; lists and strings are written as YAML flow values."""
    return f"{key}={json.dumps(value)}"


def folder_name(index: int, coords: dict[str, Any]) -> str:
    text = ",".join(f"{k.split('.')[-1]}={v}" for k, v in coords.items())
    return f"{index:03d}-" + re.sub(r"[^A-Za-z0-9=.,_-]+", "_", text)[:80]
