"""How tensors of views and velocities travel between the driver and the workers.

As numpy arrays: Ray moves a numpy array through its object store without copying it, while a
pickled torch tensor is copied on the way in and on the way out (docs/runner.md has the timings).
The torch dtype travels with the array, so a tensor arrives in the dtype it left in; bfloat16, which
numpy lacks, travels as its int16 bit pattern. Nothing is rounded in transit, which is what lets a
job on the pool equal the same job in one process bit for bit (core/models/forward.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_BIT_VIEWS = {torch.bfloat16: torch.int16}


@dataclass(frozen=True, eq=False)
class WireTensor:
    """A CPU tensor's data as a numpy array, with the torch dtype it stands for."""

    array: np.ndarray
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)


def to_wire(tensor: torch.Tensor) -> WireTensor:
    t = tensor.detach().cpu().contiguous()
    carrier = _BIT_VIEWS.get(t.dtype)
    return WireTensor((t.view(carrier) if carrier else t).numpy(), t.dtype)


def from_wire(wire: WireTensor) -> torch.Tensor:
    """A writable tensor of its own (Ray hands arrays over read-only and backed by its object store)."""
    t = torch.from_numpy(np.array(wire.array))
    return t.view(wire.dtype) if wire.dtype in _BIT_VIEWS else t
