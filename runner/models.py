"""The runner's decisions about a model: where the repository's own weights are, and where and in
which dtype the model runs. `core.models.loading.load_model` builds what it is told.

- Weights a spec names implicitly (the built-in reference model, TAEF2) are the repository's
  `models/reference` and `models/taef2`, resolved here from the checkout the runner runs from (a
  local Ray's workers and a submitted job's working directory are that checkout).
- Device: the process's GPU when it has one (a worker reserves one through Ray), else the CPU.
- dtype "auto": bfloat16 on CUDA (what Flux.1 is trained and served in; half the memory of float32
  and the tensor cores' rate), float32 on a CPU (bf16 matmuls there are slower and round more).
"""

from __future__ import annotations

import torch

from core.models.loading import DTYPES, LoadedModel, ModelSpec, WeightFolders
from core.models.loading import load_model as build_model
from runner.ray_init import REPO_ROOT

WEIGHTS = WeightFolders(
    reference=str(REPO_ROOT / "models" / "reference"), taef2=str(REPO_ROOT / "models" / "taef2")
)


def model_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_dtype(spec: ModelSpec, device: torch.device) -> torch.dtype:
    if spec.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[spec.dtype]


def load_model(spec: ModelSpec, device: torch.device | str = "cpu") -> LoadedModel:
    """`spec` built on `device` in its dtype, with the repository's weight folders."""
    device = torch.device(device)
    return build_model(spec, device=device, dtype=model_dtype(spec, device), folders=WEIGHTS)
