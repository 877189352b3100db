"""RopeSpec: how a view larger than the model's native grid extends RoPE (a config shared by the
tiling plans, which attach it to each view, and the backbone adapters, which build the tables)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, kw_only=True)
class RopeSpec:
    """How a view larger than the model's native grid extends RoPE (DyPE, arXiv 2510.20766).

    method: "none" keeps plain RoPE at any size; "yarn" and "ntk" extend it beyond native.
    dynamic: DyPE's time-dependent modulation (needs the view's sigma); False is static YaRN/NTK.
    exponent: DyPE's lambda_t (2.0 for 4K and more, 1.0 for 2-3K, 0.5 just above native).
    version: DyPE modulation v1 (beta^kappa) or v2 (beta * kappa).
    A view whose token grid is within the native grid on both axes is unaffected.
    """

    method: Literal["none", "yarn", "ntk"] = "none"
    dynamic: bool = True
    exponent: float = 2.0
    version: Literal["v1", "v2"] = "v2"

    def __post_init__(self) -> None:
        if self.method not in ("none", "yarn", "ntk"):
            raise ValueError(f"rope.method must be none, yarn or ntk, got {self.method!r}")
        if self.version not in ("v1", "v2"):
            raise ValueError(f"rope.version must be v1 or v2, got {self.version!r}")
        if self.exponent <= 0:
            raise ValueError(f"rope.exponent must be > 0, got {self.exponent}")
