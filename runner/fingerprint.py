"""A job's fingerprint: everything that determines its numbers, hashed, stored in every checkpoint.

A checkpoint is resumed only by a job with the same fingerprint (runner/context.py); one written by
a job that differed in any part is set aside and that work starts fresh, so a resume can never hand
back another input's result. The parts (docs/reliability.md):

- config: the task's resolved config, every field except the artifact switches a task declares
  (TaskEntry.artifact_settings: they choose which files are written, never a number) and the budgets
  a re-run may raise to continue a job (TaskEntry.budgets), plus the runner
  settings that change numbers (pool.max_batch: kernel shapes follow the batch);
- inputs: sha256 of the bytes of every input file the config names (TaskEntry.inputs); a folder
  counts every file under it, by relative path;
- weights: the identity of the model's weight files (TaskEntry.models, TaskEntry.weights): sha256
  of each file up to HASH_LIMIT bytes, (size, mtime) of larger ones (hashing Flux.1's 24 GB at every
  start would cost about a minute), the local cache's commit for a hub id; a random model is its
  seed and shape, which the config holds;
- code: sha256 of the sources of core/ (the math) and tasks/ (its orchestration), and the versions
  of the libraries whose kernels compute the numbers. Hashing the sources, rather than a version
  constant bumped by hand, cannot be forgotten; its price is that any edit, a comment too, retires
  old checkpoints, which costs a recomputation, never a wrong result;
- numerics: where the model ran (cpu, cuda) and its CPU thread count (runner/models.py).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import core
import tasks
from runner.config import RUNNER_KEYS, Job
from runner.models import MODEL_CPU_THREADS, WEIGHTS

HASH_LIMIT = 256 << 20  # bytes: files up to this size are hashed, larger ones identified by size and mtime
CODE_PACKAGES = ("torch", "diffusers", "transformers", "numpy")
NUMBERS_RUNNER_SETTINGS = (("pool", "max_batch"),)


@dataclass(frozen=True)
class Fingerprint:
    config: str
    inputs: dict[str, Any]
    weights: dict[str, Any]
    code: str
    numerics: dict[str, Any] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return _sha(json.dumps(asdict(self), sort_keys=True, default=str).encode())[:16]

    def as_dict(self) -> dict[str, Any]:
        return {"digest": self.digest, **asdict(self)}

    def with_numerics(self, **values: Any) -> Fingerprint:
        return replace(self, numerics={**self.numerics, **values})

    def differences(self, other: Mapping[str, Any] | None) -> list[str]:
        """The parts (e.g. "inputs.image", "code") in which a stored fingerprint differs from this one."""
        if not other:
            return ["(no fingerprint stored)"]
        mine = self.as_dict()
        out = []
        for part in ("config", "code", "inputs", "weights", "numerics"):
            a, b = mine[part], other.get(part)
            if isinstance(a, dict) and isinstance(b, dict):
                out += [f"{part}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            elif a != b:
                out.append(part)
        return out


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def numbers_config(unnumbered: Iterable[str], resolved: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a resolved job config (job.json's "config") that changes the job's numbers:
    all but the runner's keys and the task's `unnumbered` fields (TaskEntry.unnumbered)."""
    skip = set(RUNNER_KEYS) | set(unnumbered)
    out = {k: v for k, v in resolved.items() if k not in skip}
    for section, key in NUMBERS_RUNNER_SETTINGS:
        value = (resolved.get(section) or {}).get(key)
        if value is not None:
            out[f"{section}.{key}"] = value
    return json.loads(json.dumps(out, default=str))  # as job.json holds it (tuples become lists)


def config_digest(job: Job) -> str:
    settings = numbers_config(job.task.unnumbered(), job.resolved)
    return _sha(json.dumps(settings, sort_keys=True, default=str).encode())[:16]


def field_value(config: Any, dotted: str) -> Any:
    """config.a.b for "a.b"; None where a part on the way is unset (an optional block left out)."""
    value = config
    for part in dotted.split("."):
        if value is None:
            return None
        value = getattr(value, part)
    return value


def file_identity(path: Path) -> dict[str, Any]:
    stat = path.stat()
    if stat.st_size <= HASH_LIMIT:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return {"size": stat.st_size, "sha256": h.hexdigest()}
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def path_identity(value: str) -> Any:
    """A file's identity, a folder's (every file under it), or a hub id's revision in the local cache."""
    path = Path(value)
    if path.is_file():
        return file_identity(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return {str(p.relative_to(path)): file_identity(p) for p in files}
    return {"hub": value, "revision": hub_revision(value)}


def hub_revision(repo_id: str) -> str | None:
    """The commit the local Hugging Face cache resolves `repo_id` to (refs/main), or None."""
    from huggingface_hub import constants

    ref = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / "main"
    return ref.read_text().strip() if ref.is_file() else None


def model_weights(spec: Any) -> dict[str, Any]:
    """The weight files a ModelSpec names, explicitly or by default (runner/models.py's folders)."""
    out: dict[str, Any] = {}
    if spec.kind == "reference":
        out["path"] = path_identity(spec.path or WEIGHTS.reference)
    elif spec.kind == "flux":
        out["path"] = path_identity(spec.path)
    if spec.vae == "taef2" or (spec.vae == "" and spec.kind != "flux"):
        out["vae"] = path_identity(WEIGHTS.taef2)  # the reference and tiny models' default VAE
    elif spec.vae and spec.vae != "random-kl":
        out["vae"] = path_identity(spec.vae)
    return out


def code_version() -> str:
    h = hashlib.sha256()
    for package in (core, tasks):
        root = Path(package.__file__).parent
        for path in sorted(root.rglob("*.py")):
            h.update(str(path.relative_to(root.parent)).encode() + b"\0" + path.read_bytes() + b"\0")
    for name in ("tessera", *CODE_PACKAGES):
        try:
            h.update(f"{name}={importlib.metadata.version(name)}".encode())
        except importlib.metadata.PackageNotFoundError:
            h.update(f"{name}=none".encode())
    return h.hexdigest()[:16]


def job_fingerprint(job: Job) -> Fingerprint:
    """The fingerprint of a job before it runs (numerics get the workers' devices once they are up)."""
    inputs: dict[str, Any] = {}
    for name in job.task.inputs:
        value = field_value(job.config, name)
        if value:
            inputs[name] = path_identity(os.fspath(value))
    weights = {name: model_weights(field_value(job.config, name)) for name in job.task.models}
    weights.update({name: path_identity(getattr(WEIGHTS, name)) for name in job.task.weights})
    return Fingerprint(
        config=config_digest(job),
        inputs=inputs,
        weights=weights,
        code=code_version(),
        numerics={"model_cpu_threads": MODEL_CPU_THREADS},
    )


def device_kinds(infos: Iterable[Mapping[str, Any]]) -> list[str]:
    """The device types ("cpu", "cuda") of a pool's workers, from their info records."""
    return sorted({str(info.get("device", "unknown")).split(":")[0] for info in infos})
