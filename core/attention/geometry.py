"""Token geometry of one joint attention call: text (conditioning) tokens first, then the image
tokens of a rows x cols latent token grid in raster order, as Flux's transformer lays them out."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenGeometry:
    """n_text conditioning tokens, then rows x cols image tokens (index n_text + r * cols + c)."""

    n_text: int
    rows: int
    cols: int

    def __post_init__(self) -> None:
        if self.n_text < 0:
            raise ValueError(f"n_text must be >= 0, got {self.n_text}")
        if self.rows < 1 or self.cols < 1:
            raise ValueError(f"the image token grid must be at least 1 x 1, got {self.rows} x {self.cols}")

    @property
    def n_img(self) -> int:
        return self.rows * self.cols

    @property
    def n(self) -> int:
        return self.n_text + self.n_img


def index_to(index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host index table on `device`, queued like a kernel instead of waiting for the device.

    A copy from pageable host memory to a CUDA device first synchronises the stream: the host waits
    for every kernel already queued, so the launch queue drains and the small launches that follow
    run one at a time. A student forward moves a few index tables per call (landmarks, gate probes,
    their windows), 57 layers a step; from pinned memory each copy is asynchronous. The pinned block
    comes from PyTorch's caching host allocator, which does not reuse it before the copy completes.
    """
    device = torch.device(device)
    if device.type != "cuda" or index.device.type != "cpu":
        return index.to(device)
    return index.pin_memory().to(device, non_blocking=True)
