"""The working-dir package that `tessera submit` uploads with a job, built in a temporary folder.

It holds what the job needs on a cluster that has nothing but Ray and the dependencies:

- the code (core/, runner/, tasks/ of the tree this command runs from), so the cluster runs the
  code that validated the job; `python -m runner` in the package imports it first;
- the built-in weights the job uses (from where runner/models.py finds them: a checkout, a wheel
  install or TESSERA_MODELS): TAEF2 (5 MB, the reference and tiny models' VAE, and
  what training encodes with) and the LPIPS heads (24 KB) always, the reference model (39 MB) only
  when the job's model is the built-in one. Flux weights are never uploaded: they are a path on
  the cluster or a hub id. Ray names a package by its content hash, so resubmitting the same job
  uploads nothing again;
- the job file, written from the configuration resolved here (file plus overrides, sweep value
  files inlined), with `output` set to where the results go and each input rewritten to its copy;
- the inputs (the task's input fields, `runner.registry.TaskEntry.inputs`), under inputs/FIELD/.

Nothing else of the working directory travels: no runs/, bench results, .git or virtualenv.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from runner.config import Job, JobConfigError
from runner.models import MODELS, missing_builtin
from runner.ray_init import REPO_ROOT
from runner.storage import is_uri
from runner.summary import version, write_source
from runner.sweep import sweep_values

CODE = ("core", "runner", "tasks")
ALWAYS_WEIGHTS = ("taef2", "lpips")
MAX_PACKAGE_BYTES = 400 * 2**20  # Ray refuses working dirs over 512 MiB; leave room for the zip
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")


@dataclass
class Package:
    folder: Path
    job_file: str  # the job file's name inside the package
    resolved: dict[str, Any]  # the configuration the cluster runs
    inputs: dict[str, Any] = field(default_factory=dict)  # field -> uploaded package path(s)
    weights: list[str] = field(default_factory=list)

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.folder.rglob("*") if p.is_file())


def build_package(
    job: Job, folder: Path, *, job_name: str, output: str, base: Path, inputs_on_cluster: bool
) -> Package:
    """Fill `folder` with the job's package; base: the job file's folder (sweep value files)."""
    resolved = copy.deepcopy(job.resolved)
    resolved["output"] = output
    pkg = Package(folder, job_name, resolved)
    for name in CODE:
        shutil.copytree(REPO_ROOT / name, folder / name, ignore=_IGNORE)
    pyproject = REPO_ROOT / "pyproject.toml"  # the version, for job.json; makes the package a checkout
    if pyproject.is_file():
        shutil.copy2(pyproject, folder / "pyproject.toml")
    else:  # submitted from a wheel install
        (folder / "pyproject.toml").write_text(f'[project]\nname = "tessera"\nversion = "{version()}"\n')
    write_source(folder)  # the commit, for job.json: no .git travels
    _copy_weights(job, pkg)
    for key in job.task.inputs:
        value = _get(resolved, key)
        if value:
            _set(resolved, key, _input(pkg, key, value, inputs_on_cluster))
    sweep = resolved.get("sweep") or {}
    for key, value in list(sweep.items()):
        try:
            values = sweep_values(key, value, base)
        except ValueError as err:
            raise JobConfigError(str(err)) from None
        if key in job.task.inputs:
            values = [_input(pkg, key, v, inputs_on_cluster, index=i) for i, v in enumerate(values)]
        sweep[key] = values
    (folder / job_name).write_text(yaml.safe_dump(resolved, sort_keys=False))
    size = pkg.size()
    if size > MAX_PACKAGE_BYTES:
        raise JobConfigError(
            f"the job's package is {size / 2**20:.0f} MiB (inputs {sorted(pkg.inputs)}), over the "
            f"{MAX_PACKAGE_BYTES / 2**20:.0f} MiB Tessera uploads: put the inputs on a volume the "
            "cluster mounts and pass --inputs-on-cluster with their paths there"
        )
    return pkg


def _get(data: dict, key: str) -> Any:
    for part in key.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def _set(data: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        data = data[part]
    data[last] = value


def _copy_weights(job: Job, pkg: Package) -> None:
    models = MODELS
    spec = getattr(job.config, "model", None)
    names = list(ALWAYS_WEIGHTS)
    if spec is not None and spec.kind == "reference" and not spec.path:
        names.append("reference")
    for name in names:
        src = models / name
        if not src.is_dir():
            if name in ("reference", "taef2"):
                raise JobConfigError(missing_builtin(name, models))
            continue
        # samples.png and other pictures document the weights; the job does not read them
        shutil.copytree(src, pkg.folder / "models" / name, ignore=shutil.ignore_patterns("*.png", ".*"))
        pkg.weights.append(name)


def _input(pkg: Package, key: str, value: Any, on_cluster: bool, index: int | None = None) -> str:
    """The package path an input is uploaded to (or, on the cluster, the path as given)."""
    if not isinstance(value, str):
        raise JobConfigError(f"{key}: expected a path, got {value!r}")
    if is_uri(value):
        raise JobConfigError(
            f"{key} {value!r} is a URI; inputs are files: give a path on this machine (uploaded with "
            "the job) or, with --inputs-on-cluster, a path on the cluster's nodes"
        )
    if on_cluster:
        if not Path(value).is_absolute():
            raise JobConfigError(
                f"{key} {value!r} is relative: with --inputs-on-cluster inputs are paths on the "
                "cluster's nodes, so give an absolute path"
            )
        return value
    src = Path(value).expanduser().resolve()
    if not src.exists():
        raise JobConfigError(f"{key} {value!r} does not exist on this machine ({src})")
    name = src.name if index is None else f"{index}-{src.name}"
    rel = f"inputs/{key}/{name}"
    dest = pkg.folder / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dest, ignore=_IGNORE)
    else:
        shutil.copy2(src, dest)
    pkg.inputs.setdefault(key, []).append(rel)
    return rel
