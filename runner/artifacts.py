"""Writing a job's files: PNG images, JSON, checkpoints. Writes are atomic (a temporary file then
`os.replace`), so an interrupted job never leaves half a file for a resume to trip on.

A checkpoint carries the fingerprint of the job that wrote it (runner/fingerprint.py) and keeps the
one it replaces as `<name>.prev`; reading one that is damaged (truncated by a full disk, corrupted
in a copy) raises DamagedFileError, and the caller sets it aside (`set_aside`: renamed, never
deleted) and falls back to the previous one (runner/context.py).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import uuid
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from core.eval.pictures import to_uint8


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: its files are mode 0600, and results are read by others (a shared results
    # volume, a web server, a colleague). Created here as open() would create them: 0666 less the umask.
    tmp = str(path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}")
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def to_uint8_image(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """float [3, H, W] / [1, 3, H, W] in [0, 1], or uint8 [H, W, 3] -> uint8 [H, W, 3]."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"numpy images must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
        return image
    return to_uint8(image)


def write_png(path: Path, image: torch.Tensor | np.ndarray) -> None:
    arr = to_uint8_image(image)
    _atomic(path, lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "__dataclass_fields__"):
        return {k: getattr(obj, k) for k in obj.__dataclass_fields__}
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def _finite(obj: Any) -> Any:
    """JSON has no inf/nan: write them as strings so files stay standard JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: Path, data: Any) -> None:
    text = json.dumps(_finite(json.loads(json.dumps(data, default=_json_default))), indent=2) + "\n"
    _atomic(path, lambda tmp: Path(tmp).write_text(text))


FINGERPRINT_KEY = "__fingerprint__"  # beside a state's own keys (runner/fingerprint.py)
PREVIOUS = ".prev"


class DamagedFileError(Exception):
    """A checkpoint that exists but cannot be read (truncated, corrupt, not the format)."""


@dataclass(frozen=True)
class Stored:
    """A checkpoint as read back: its contents and the fingerprint of the job that wrote it."""

    contents: dict[str, Any]
    fingerprint: dict[str, Any] | None


def previous(path: Path) -> Path:
    """The checkpoint one save before `path` (kept so a damaged newest one costs one interval)."""
    return path.with_name(path.name + PREVIOUS)


def _replace_keeping_previous(path: Path, write) -> None:
    """Write atomically, and keep the file being replaced as `previous(path)`."""

    def write_then_keep(tmp: str) -> None:
        write(tmp)
        if path.exists():
            os.replace(path, previous(path))

    _atomic(path, write_then_keep)


def write_tensors(path: Path, tensors: Mapping[str, torch.Tensor], fingerprint: dict | None = None) -> None:
    plain = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = None if fingerprint is None else {FINGERPRINT_KEY: json.dumps(fingerprint, sort_keys=True)}
    _replace_keeping_previous(path, lambda tmp: save_file(plain, tmp, metadata=metadata))


def read_tensors(path: Path) -> Stored | None:
    """A safetensors checkpoint with its fingerprint (None when the file has none), or None when
    there is no file; DamagedFileError when it cannot be read."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise DamagedFileError(f"{type(err).__name__}: {err}") from None
    stamp = metadata.get(FINGERPRINT_KEY)
    return Stored(tensors, json.loads(stamp) if stamp else None)


def write_state(path: Path, state: Mapping[str, Any], fingerprint: dict | None = None) -> None:
    """A state_dict() (nested tensors, numbers, strings, lists, dicts) as a torch file, atomically, with
    the writing job's fingerprint under FINGERPRINT_KEY."""
    if FINGERPRINT_KEY in state:
        raise ValueError(f"a state_dict may not use the key {FINGERPRINT_KEY!r} (the runner's)")
    data = dict(state) if fingerprint is None else {**state, FINGERPRINT_KEY: fingerprint}
    _replace_keeping_previous(path, lambda tmp: torch.save(data, tmp))


def read_state(path: Path) -> Stored | None:
    """A state written by write_state, or None when there is none; DamagedFileError when the file
    cannot be read. weights_only: nothing but tensors and plain containers is unpickled, so a
    checkpoint file cannot run code."""
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise DamagedFileError(f"{type(err).__name__}: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise DamagedFileError(f"holds a {type(data).__name__}, not a state dict")
    stamp = data.pop(FINGERPRINT_KEY, None)
    return Stored(data, stamp)


def set_aside(path: Path, why: str) -> Path:
    """Rename a file that must not be used (never delete it): `<name>.<why>`, or `<name>.<why>-N`."""
    target = path.with_name(f"{path.name}.{why}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.{why}-{n}")
    os.replace(path, target)
    return target


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def read_images(folder: str | Path) -> list[torch.Tensor]:
    """Every PNG/JPEG under folder (recursive, sorted by path) as uint8 [3, H, W] (alpha dropped,
    greyscale expanded)."""
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no PNG or JPEG images under {str(folder)!r}")
    images = []
    for path in paths:
        with Image.open(path) as im:
            images.append(torch.from_numpy(np.array(im.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1))
    return images


def read_image(path: str | Path) -> torch.Tensor:
    """A PNG/JPEG as float [1, 3, H, W] in [0, 1] (alpha dropped, greyscale expanded)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist")
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except OSError as err:  # a damaged file: name it (the runner's pre-flight decodes inputs first)
        raise ValueError(f"image {str(path)!r} cannot be decoded: {err}") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255).unsqueeze(0)
