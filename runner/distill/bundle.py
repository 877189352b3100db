"""The students bundle: a folder with one safetensors file of weights per layer and one JSON manifest.

    students/
      manifest.json            format, layers, every hyperparameter, readiness, losses, assignment
      double_0.safetensors     the student of layer "double:0" (its state_dict's tensors)
      single_3.safetensors     ...

The manifest is the only file that says what the others are: per layer its student config (heads,
head_dim, feature size and the rest, so `Student` is rebuilt without other information), whether
it is ready and may serve, its readiness state and last losses, its update count, its layer group
and the worker that trained it; and, for the whole bundle, every hyperparameter of the run that
made it and the layer assignment. Each weight file is listed with its byte size and SHA-256, so a
damaged, truncated or swapped file is an error naming the file, never a silently different
student. Writes are atomic per file and the manifest is written last, so a crash while saving
leaves the previous manifest (whose files it checks) or the new one, never a mix that loads.

docs/distill.md describes the format for users of the bundle (serving, the controller).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from core.attention.config import STUDENT_FORMAT, StudentConfig
from core.attention.student import Student
from runner.artifacts import write_json, write_tensors

BUNDLE_FORMAT = "tessera-students"
BUNDLE_VERSION = 1
MANIFEST = "manifest.json"


class BundleError(ValueError):
    """A students folder that cannot be loaded; the message names the file and what is wrong."""


@dataclass(frozen=True, kw_only=True)
class LayerEntry:
    """One layer's student and what the run knew about it when the bundle was written.

    ready: the readiness gate's decision (EMA of validation cosine distance with hysteresis).
    may_serve: ready, finite and its last loss under the ceiling (the fail-closed serving rule).
    readiness: the readiness state (JSON-ready: EMA values, counts, thresholds).
    losses: the last update's loss parts; updates: optimizer updates so far.
    group, worker: the layer group and the worker that trained it.
    """

    key: str
    student: StudentConfig
    weights: dict[str, torch.Tensor]
    ready: bool = False
    may_serve: bool = False
    readiness: dict[str, Any] = field(default_factory=dict)
    losses: dict[str, float] = field(default_factory=dict)
    updates: int = 0
    group: int = 0
    worker: int = 0

    @classmethod
    def of(cls, key: str, student: Student, **facts: Any) -> LayerEntry:
        """An entry for `student` (its tensors copied to the CPU; `_extra_state` goes to the manifest)."""
        weights = {
            k: v.detach().cpu().clone() for k, v in student.state_dict().items() if k != "_extra_state"
        }
        return cls(key=key, student=student.config, weights=weights, **facts)

    def build(self, device: torch.device | str = "cpu") -> Student:
        """The student, rebuilt from its config and weights, on `device`, in eval mode."""
        student = Student(self.student)
        student.load_state_dict({**self.weights, "_extra_state": _extra_state(self.student)})
        return student.to(device).eval().requires_grad_(False)


@dataclass(frozen=True, kw_only=True)
class StudentsBundle:
    """layers: key -> entry, in the model's layer order; hyperparameters: the run's whole config;
    assignment: layer groups and group -> worker; meta: what made it (model, job, runs done)."""

    layers: dict[str, LayerEntry]
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    assignment: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def servable(self) -> tuple[str, ...]:
        """Keys of the layers that may serve (ready, finite, last loss under the ceiling)."""
        return tuple(k for k, e in self.layers.items() if e.may_serve)


def layer_file(key: str) -> str:
    """ "single:3" -> "single_3.safetensors"."""
    kind, _, index = key.partition(":")
    if kind not in ("double", "single") or not index.isdigit():
        raise ValueError(f"layer key must be double:i or single:i, got {key!r}")
    return f"{kind}_{int(index)}.safetensors"


def _extra_state(config: StudentConfig) -> dict[str, Any]:
    return {"format": STUDENT_FORMAT, "config": asdict(config)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_bundle(folder: str | Path, bundle: StudentsBundle) -> Path:
    """Write `bundle` into `folder` (created): the weight files, then the manifest. Returns the
    manifest's path. Weight files of layers no longer in the bundle are left alone (the manifest
    does not list them, so they are never loaded)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers = {}
    for key, entry in bundle.layers.items():
        if entry.key != key:
            raise ValueError(f"bundle layer {key!r} holds an entry for {entry.key!r}")
        name = layer_file(key)
        write_tensors(folder / name, entry.weights)
        layers[key] = {
            "file": name,
            "bytes": (folder / name).stat().st_size,
            "sha256": _sha256(folder / name),
            "student": asdict(entry.student),
            "features": entry.student.features,
            "heads": entry.student.heads,
            "head_dim": entry.student.head_dim,
            "ready": entry.ready,
            "may_serve": entry.may_serve,
            "readiness": entry.readiness,
            "losses": entry.losses,
            "updates": entry.updates,
            "group": entry.group,
            "worker": entry.worker,
        }
    manifest = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "student_format": STUDENT_FORMAT,
        "layers": layers,
        "hyperparameters": bundle.hyperparameters,
        "assignment": bundle.assignment,
        "meta": bundle.meta,
    }
    write_json(folder / MANIFEST, manifest)
    return folder / MANIFEST


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a students folder, checked for format and version (weights not read)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise BundleError(f"students bundle {str(folder)!r}: no {MANIFEST} (not a students folder)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"students bundle manifest {str(path)!r} is not valid JSON: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{str(path)!r} is not a students manifest (format {BUNDLE_FORMAT!r} expected)")
    if manifest.get("version") != BUNDLE_VERSION or manifest.get("student_format") != STUDENT_FORMAT:
        raise BundleError(
            f"{str(path)!r} has bundle version {manifest.get('version')} / student format "
            f"{manifest.get('student_format')}; this code reads {BUNDLE_VERSION} / {STUDENT_FORMAT}"
        )
    if not isinstance(manifest.get("layers"), dict):
        raise BundleError(f"{str(path)!r} has no layers mapping")
    return manifest


def load_bundle(folder: str | Path) -> StudentsBundle:
    """Read a students folder; BundleError naming the file on any damage (missing, wrong size or
    checksum, unreadable, tensors that do not fit the layer's student config)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    layers = {key: _load_layer(folder, key, item) for key, item in manifest["layers"].items()}
    return StudentsBundle(
        layers=layers,
        hyperparameters=manifest.get("hyperparameters", {}),
        assignment=manifest.get("assignment", {}),
        meta=manifest.get("meta", {}),
    )


def _load_layer(folder: Path, key: str, item: Mapping[str, Any]) -> LayerEntry:
    where = f"students bundle {str(folder)!r}, layer {key}"
    try:
        path = folder / item["file"]
        config = StudentConfig(**item["student"])
        expected_bytes, expected_sha = int(item["bytes"]), str(item["sha256"])
    except (KeyError, TypeError, ValueError) as err:
        raise BundleError(f"{where}: manifest entry is incomplete or invalid ({err})") from None
    if path.name != layer_file(key):
        raise BundleError(f"{where}: manifest names file {item['file']!r}, expected {layer_file(key)!r}")
    if not path.is_file():
        raise BundleError(f"{where}: weight file {str(path)!r} is missing")
    size = path.stat().st_size
    if size != expected_bytes or _sha256(path) != expected_sha:
        raise BundleError(
            f"{where}: weight file {str(path)!r} is damaged ({size} bytes, expected {expected_bytes}; "
            "or its SHA-256 differs from the manifest's)"
        )
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise BundleError(f"{where}: weight file {str(path)!r} cannot be read: {err}") from None
    entry = LayerEntry(
        key=key,
        student=config,
        weights=weights,
        ready=bool(item.get("ready", False)),
        may_serve=bool(item.get("may_serve", False)),
        readiness=dict(item.get("readiness", {})),
        losses=dict(item.get("losses", {})),
        updates=int(item.get("updates", 0)),
        group=int(item.get("group", 0)),
        worker=int(item.get("worker", 0)),
    )
    try:
        entry.build("cpu")
    except (RuntimeError, ValueError) as err:
        raise BundleError(
            f"{where}: weight file {str(path)!r} does not fit its student config: {err}"
        ) from None
    return entry
