"""The controller half of a generation or upscale job's `attention:` block.

    attention:
      students: runs/distill/students       # the bundle (tasks/distill_attention.py)
      controller: runs/controller/controller.pt
      policy: threshold                     # or stochastic
      quality_speed: 0.5                    # 0 = quality (route little), 1 = speed (route much)

With a controller, each diffusion step routes the layers the trained policy picks at that step's
sigma, guidance and token grid (core/control/inference.py) among the layers whose students may
serve; those still fail closed. The decision is made once per step, logged once, and every step's
decision (sigma, quality_speed, student layers) goes into job.json.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.control.inference import INFERENCE_MODES, InferenceMode, check_quality_speed


@dataclass(frozen=True, kw_only=True)
class ControllerAttention:
    controller: str
    policy: InferenceMode = "threshold"
    quality_speed: float = 0.5
    temperature: float = 1.0  # stochastic only
    seed: int = 0  # stochastic only: draws keyed by (seed, step)

    def __post_init__(self) -> None:
        if not self.controller:
            raise ValueError("attention.controller must name a controller file (task: controller), got ''")
        if self.policy not in INFERENCE_MODES:
            raise ValueError(f"attention.policy must be one of {INFERENCE_MODES}, got {self.policy!r}")
        try:
            check_quality_speed(self.quality_speed)
        except ValueError:
            raise ValueError(f"attention.quality_speed must be in [0, 1], got {self.quality_speed}") from None
        if not self.temperature > 0:
            raise ValueError(f"attention.temperature must be > 0, got {self.temperature}")
