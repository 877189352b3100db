"""StudentConfig: the hyperparameters of one layer's attention student.

heads and head_dim come from the layer; the rest are decisions of a distillation run. Defaults:
- features F = 128: the kernel branch costs about 8 N F d flops, a few per cent of softmax attention
  at 1024 px and above. F must be a multiple of 64 in [64, 4096]: the feature dimension is the
  inner and outer size of the branch's matrix products (phi_k^T v, phi_q KV), and multiples of 64
  fill whole bf16 tensor-core tiles and Triton blocks in the fused kernel that replaces this code.
- feature_depth 2: phi's MLP is d -> h -> h -> F with h = max(d, 2F).
- landmarks: M = clamp(round(0.08 n_img), 64, 512). The cap keeps the branch linear: 512 landmarks
  at 65,536 image tokens (4096 px on Flux) cost 0.8 % of the full softmax.
- local window: tiles of 8 x 8 tokens, radius 1 tile: a 24 x 24-token window around each tile.
- gates: alpha_max 0.5 per global branch (so the local weight 1 - alpha_k - alpha_l stays >= 0),
  initialised to alpha_init = 0.1 of it, i.e. 0.05 each at dbar = 1/2: the local branch carries
  90 % of the output at initialisation.
"""

from __future__ import annotations

from dataclasses import dataclass

STUDENT_FORMAT = 1
"""Version of the student's state layout (its parameters and this config); bumped on any change."""


@dataclass(frozen=True, kw_only=True)
class StudentConfig:
    heads: int
    head_dim: int
    features: int = 128
    feature_depth: int = 2
    landmark_fraction: float = 0.08
    landmark_min: int = 64
    landmark_max: int = 512
    local_tile: int = 8
    local_radius: int = 1
    alpha_max: float = 0.5
    alpha_init: float = 0.1

    def __post_init__(self) -> None:
        if self.heads < 1:
            raise ValueError(f"student.heads must be >= 1, got {self.heads}")
        if self.head_dim < 1:
            raise ValueError(f"student.head_dim must be >= 1, got {self.head_dim}")
        if self.features % 64 or not 64 <= self.features <= 4096:
            raise ValueError(f"student.features must be a multiple of 64 in [64, 4096], got {self.features}")
        if not 0 <= self.feature_depth <= 4:
            raise ValueError(f"student.feature_depth must be in [0, 4], got {self.feature_depth}")
        if not 0.0 < self.landmark_fraction <= 1.0:
            raise ValueError(f"student.landmark_fraction must be in (0, 1], got {self.landmark_fraction}")
        if self.landmark_min < 1:
            raise ValueError(f"student.landmark_min must be >= 1, got {self.landmark_min}")
        if self.landmark_max < self.landmark_min:
            raise ValueError(
                f"student.landmark_max must be >= landmark_min ({self.landmark_min}), got {self.landmark_max}"
            )
        if self.local_tile < 1:
            raise ValueError(f"student.local_tile must be >= 1, got {self.local_tile}")
        if self.local_radius < 0:
            raise ValueError(f"student.local_radius must be >= 0, got {self.local_radius}")
        if not 0.0 < self.alpha_max <= 0.5:
            raise ValueError(f"student.alpha_max must be in (0, 0.5], got {self.alpha_max}")
        if not 0.0 < self.alpha_init < 1.0:
            raise ValueError(f"student.alpha_init must be in (0, 1), got {self.alpha_init}")


@dataclass(frozen=True, kw_only=True)
class ForwardLimits:
    """Working-set limits of one student forward, for this call only (a trainer's out-of-memory ladder
    lowers them, core/distill/oom_ladder.py); None keeps the branch's own default.

    query_chunk: queries read out at once (kernel and landmark branches); key_chunk: keys summarised at
    once (kernel branch); landmark_cap: at most this many image landmarks, below config.landmark_max.
    The chunks change only the order of fp32 sums; the landmark cap changes the function for the call,
    while the student's config, and so what it serves, stay as they are.
    """

    query_chunk: int | None = None
    key_chunk: int | None = None
    landmark_cap: int | None = None

    def __post_init__(self) -> None:
        for name in ("query_chunk", "key_chunk", "landmark_cap"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"forward limits.{name} must be >= 1 or None, got {value}")
