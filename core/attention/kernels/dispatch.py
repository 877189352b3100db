"""Whether the student's fused GPU path can run a call; importing this module never imports Triton.

The fused path covers the default student shape family: phi with feature_depth 2, power-of-two
head_dim (16..256), features (64..128) and hidden width (<= 256), and local tiles of 4 or 8 tokens
(16 or 64 queries per program). Other configs, CPU tensors, machines without Triton, and calls that
need gradients with respect to q, k or v run the PyTorch code of core/attention, which is the
reference the kernels are tested against.
"""

from __future__ import annotations

import importlib.util

import torch

from core.attention.config import StudentConfig

FUSED_TILES = (4, 8)
FUSED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _power_of_two(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def config_supported(config: StudentConfig) -> bool:
    """The config is one the kernels are written for (see the module docstring)."""
    hidden = max(config.head_dim, 2 * config.features)
    return (
        config.feature_depth == 2
        and _power_of_two(config.head_dim)
        and 16 <= config.head_dim <= 256
        and _power_of_two(config.features)
        and config.features <= 128
        and hidden <= 256
        and config.local_tile in FUSED_TILES
    )


def fused_applies(config: StudentConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """The fused path runs: CUDA inputs of a supported dtype and config, Triton, no input gradients."""
    return (
        q.is_cuda
        and q.dtype in FUSED_DTYPES
        and not (q.requires_grad or k.requires_grad or v.requires_grad)
        and config_supported(config)
        and importlib.util.find_spec("triton") is not None
    )
