"""Building modules with seeded weights, the two ways the project needs, each in one place.

- `build_seeded(make, seed)`: the modules' own initialisation (diffusers initialises through torch's
  global RNG), seeded inside `fork_rng` so the caller's RNG state is left as it was. On the CPU in
  float32: the tiny test model and a fresh reference model to train, identical in every process
  that builds them with the same seed.
- `build_random(cls, config, dtype=, device=, seed=, std=)`: built on the meta device, allocated in
  the target dtype on the target device and filled there from a generator seeded on that device, so
  a 12 B-parameter Flux never exists in float32 or on the host and fills in seconds (torchtitan's
  meta -> `to_empty` -> init). Compute equals the real model's: benchmarks at full scale need no
  weights. Workers on the same device type hold the same weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


def build_seeded(make: Callable[[], M], seed: int) -> M:
    """make() with every initial draw taken after torch.manual_seed(seed); the RNG state is restored."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def build_random(
    cls: type[M],
    config: Mapping[str, Any],
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    seed: int,
    std: float | None = None,
) -> M:
    """cls(**config) with random weights, in eval mode without gradients.

    Tensors of 2+ dims ~ N(0, std^2), std None = 1 / sqrt(fan_in) (fan_in: the elements of one output
    row, LeCun's rule, which keeps activations near unit scale through deep stacks); other weights
    (norm gains) 1; biases 0.
    """
    with torch.device("meta"):
        module = cls(**config).to(dtype)  # allocate in the target dtype: 24 GB for Flux.1-dev, not 48
    if any(True for _ in module.buffers()):
        raise ValueError(f"{cls.__name__} has buffers, which build_random cannot initialise")
    module = module.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, std if std is not None else p[0].numel() ** -0.5, generator=gen)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    return module.eval().requires_grad_(False)
