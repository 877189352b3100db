"""The `attention:` block of generation and upscale jobs: serve a students bundle's ready layers.

    attention:
      students: runs/distill/students     # a students folder written by `task: distill`
      layers: ready                       # every layer the bundle marks ready; or e.g. "single",
                                          # "single:0-3": those of them that are ready
      controller: runs/controller/controller.pt   # optional (tasks/controller_attention.py): route
      policy: threshold                     # per step only the layers a trained controller picks
      quality_speed: 0.5                    # 0 = quality (route little), 1 = speed (route much)

Serving fails closed: a layer serves its student only if the bundle marks it ready and its last
loss was under the ceiling, the call has no attention mask, and every output of the student is
finite; otherwise the teacher (the layer's own attention) serves and the cause is counted. The
runner loads the bundle on the workers (runner/distill/serving.py) and writes into job.json which
layers were routed and, per layer, how many calls the students served and how many fell back.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.control.inference import INFERENCE_MODES, InferenceMode, check_quality_speed
from core.models.attention_hook import LayerSet
from tasks.controller_attention import ControllerAttention

READY = "ready"


@dataclass(frozen=True, kw_only=True)
class AttentionConfig:
    """students: a students folder (runner/distill/bundle.py); layers: "ready" or a layer set
    (core.models.attention_hook.LayerSet syntax) restricting which ready layers serve; controller:
    a controller file trained on this bundle (task: controller), "" for none; policy and
    quality_speed: how its decisions are made (core/control/inference.py); min_image_tokens: attention
    calls of fewer image tokens keep the teacher (where the student is slower: the small views of
    a progressive upscale), counted as `small` in job.json, 0 for none."""

    students: str
    layers: str = READY
    controller: str = ""
    policy: InferenceMode = "threshold"
    quality_speed: float = 0.5
    min_image_tokens: int = 0

    def __post_init__(self) -> None:
        if not self.students:
            raise ValueError("attention.students must name a students folder, got ''")
        if self.min_image_tokens < 0:
            raise ValueError(f"attention.min_image_tokens must be >= 0, got {self.min_image_tokens}")
        if self.min_image_tokens and self.controller:
            raise ValueError(
                "attention.min_image_tokens applies to students routed without a controller; "
                f"got min_image_tokens={self.min_image_tokens} with controller={self.controller!r}"
            )
        if self.layers != READY:
            try:
                LayerSet.parse(self.layers)
            except ValueError as err:
                raise ValueError(f"attention.layers must be 'ready' or a layer set: {err}") from None
        if self.policy not in INFERENCE_MODES:
            raise ValueError(f"attention.policy must be one of {INFERENCE_MODES}, got {self.policy!r}")
        try:
            check_quality_speed(self.quality_speed)
        except ValueError:
            raise ValueError(f"attention.quality_speed must be in [0, 1], got {self.quality_speed}") from None

    def selection(self) -> LayerSet | None:
        """The layer set restricting the ready layers, None for all of them."""
        return None if self.layers == READY else LayerSet.parse(self.layers)

    def control(self) -> ControllerAttention | None:
        """The controller's serving settings, None without a controller."""
        if not self.controller:
            return None
        return ControllerAttention(
            controller=self.controller, policy=self.policy, quality_speed=self.quality_speed
        )
