"""The runner's decisions about a model: where the built-in weights are, and where and in which
dtype the model runs. `core.models.loading.load_model` builds what it is told.

- Built-in weights (the reference model, TAEF2 and the LPIPS heads: what a spec names implicitly)
  live in one folder with `reference/`, `taef2/` and `lpips/`, found in this order
  (`builtin_models_folder`):
  1. `TESSERA_MODELS`, when set (a copy on a shared volume or in an image; used as given);
  2. the checkout's `models/`: a source tree, and a submitted job's package (runner/package.py),
     which is laid out like one (its pyproject.toml beside runner/);
  3. the wheel's copy: pyproject.toml ships them as data files, which pip installs under the
     environment's data folder as `share/tessera/models` (sys.prefix in a virtual environment, the
     user base for `pip install --user`).
  A folder that has none of them leaves the checkout's path in place, and loading names all three.
- Device: the process's GPU when it has one (a worker reserves one through Ray), else the CPU.
- dtype "auto": bfloat16 on CUDA (what Flux.1 is trained and served in; half the memory of float32
  and the tensor cores' rate), float32 on a CPU (bf16 matmuls there are slower and round more).
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import torch

from core.models.loading import DTYPES, LoadedModel, ModelSpec, WeightFolders
from core.models.loading import load_model as build_model
from runner.ray_init import REPO_ROOT

MODELS_ENV = "TESSERA_MODELS"
WHEEL_MODELS = Path("share") / "tessera" / "models"  # the data-files target in pyproject.toml
BUILTIN = ("reference", "taef2", "lpips")


def is_checkout(root: Path = REPO_ROOT) -> bool:
    """A source tree (or a submitted package, laid out as one), not site-packages of an install."""
    return (root / "pyproject.toml").is_file() and (root / "runner").is_dir()


def wheel_models_folders() -> list[Path]:
    """Where pip puts the wheel's data files: this environment's data folder, then the user base."""
    schemes = [sysconfig.get_default_scheme(), sysconfig.get_preferred_scheme("user")]
    return list(dict.fromkeys(Path(sysconfig.get_path("data", s)) / WHEEL_MODELS for s in schemes))


def builtin_models_folder(environ: dict[str, str] | None = None) -> Path:
    """The folder of the built-in weights (see the module docstring for the order)."""
    env = os.environ if environ is None else environ
    if env.get(MODELS_ENV):
        return Path(env[MODELS_ENV]).expanduser()
    checkout = REPO_ROOT / "models"
    if is_checkout() and checkout.is_dir():
        return checkout
    return next((f for f in wheel_models_folders() if f.is_dir()), checkout)


def missing_builtin(name: str, folder: Path) -> str:
    """Empty when the built-in weights `name` are in `folder`; else where they are looked for."""
    if (folder / name).is_dir():
        return ""
    return (
        f"the built-in weights {name!r} are not in {str(folder)!r}: they are looked for in "
        f"${MODELS_ENV} (a folder holding {', '.join(BUILTIN)}), then a checkout's models/, then a wheel "
        f"install's {WHEEL_MODELS} (reinstall the tessera wheel, or set {MODELS_ENV})"
    )


MODELS = builtin_models_folder()
WEIGHTS = WeightFolders(reference=str(MODELS / "reference"), taef2=str(MODELS / "taef2"))


def model_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_dtype(spec: ModelSpec, device: torch.device) -> torch.dtype:
    if spec.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[spec.dtype]


def load_model(spec: ModelSpec, device: torch.device | str = "cpu") -> LoadedModel:
    """`spec` built on `device` in its dtype, with the repository's weight folders."""
    device = torch.device(device)
    for name in _builtin_needs(spec):
        problem = missing_builtin(name, MODELS)
        if problem:
            raise FileNotFoundError(problem)
    return build_model(spec, device=device, dtype=model_dtype(spec, device), folders=WEIGHTS)


def _builtin_needs(spec: ModelSpec) -> list[str]:
    """The built-in weights a spec names implicitly (core.models.loading: reference with no path;
    TAEF2 for vae "taef2", and by default for the reference and tiny models)."""
    needs = ["reference"] if spec.kind == "reference" and not spec.path else []
    if spec.vae == "taef2" or (spec.vae == "" and (spec.kind == "reference" or spec.shape == "tiny")):
        needs.append("taef2")
    return needs
