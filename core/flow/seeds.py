"""Deterministic seeds and noise (docs/upscale.md, "Phases": seeds).

Every random draw is keyed by (job seed, purpose, phase, step, ...) and made on a CPU generator in
float32 at the full shape it is used at, then moved to the target device and dtype. Nothing
depends on the tile, the worker or the batch that uses it, so results are the same for any number
of workers.
"""

from __future__ import annotations

import hashlib

import torch

MASK64 = (1 << 64) - 1
GOLDEN64 = 0x9E3779B97F4A7C15


def splitmix64(x: int) -> int:
    """One SplitMix64 output for state x (Steele, Lea and Flood 2014)."""
    x = (x + GOLDEN64) & MASK64
    z = x
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def _key_int(part: int | str) -> int:
    if isinstance(part, int):
        return part & MASK64
    return int.from_bytes(hashlib.blake2b(part.encode(), digest_size=8).digest(), "little")


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 64-bit seed that is a pure function of (seed, *keys), mixed with SplitMix64."""
    state = splitmix64(seed & MASK64)
    for part in keys:
        state = splitmix64(state ^ _key_int(part))
    return state


def stage_seed(seed: int, stage: int) -> int:
    """FlowMatching-Upscaler stage seeds: (seed + stage * 0x9E3779B97F4A7C15) mod 2^64."""
    return (seed + stage * GOLDEN64) & MASK64


def cpu_generator(seed: int) -> torch.Generator:
    """A CPU generator; torch takes seeds below 2^63 as given, so fold the 64-bit seed."""
    return torch.Generator(device="cpu").manual_seed(seed & ((1 << 63) - 1))


def gaussian_noise(
    shape: tuple[int, ...] | torch.Size,
    seed: int,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise of `shape`, drawn in float32 on a CPU generator, then moved."""
    eps = torch.randn(tuple(shape), generator=cpu_generator(seed), dtype=torch.float32)
    return eps.to(device=device, dtype=dtype)
