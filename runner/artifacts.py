"""Writing a job's files: PNG images, JSON, safetensors checkpoints. Writes are atomic (a temporary
file then `os.replace`), so an interrupted job never leaves half a file for a resume to trip on."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from core.eval.pictures import to_uint8


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
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


def write_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    plain = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic(path, lambda tmp: save_file(plain, tmp))


def read_tensors(path: Path) -> dict[str, torch.Tensor] | None:
    return load_file(str(path)) if path.is_file() else None


def write_state(path: Path, state: Mapping[str, Any]) -> None:
    """A state_dict() (nested tensors, numbers, strings, lists, dicts) as a torch file, atomically."""
    _atomic(path, lambda tmp: torch.save(dict(state), tmp))


def read_state(path: Path) -> dict[str, Any] | None:
    """A state written by write_state, or None when there is none. weights_only: nothing but
    tensors and plain containers is unpickled, so a checkpoint file cannot run code."""
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


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
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255).unsqueeze(0)
