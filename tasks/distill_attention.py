"""The `attention:` block of generation and upscale jobs: serve a students bundle's ready layers.

    attention:
      students: runs/distill/students     # a students folder written by `task: distill`
      layers: ready                       # every layer the bundle marks ready; or e.g. "single",
                                          # "single:0-3": those of them that are ready

Serving fails closed: a layer serves its student only if the bundle marks it ready and its last
loss was under the ceiling, the call has no attention mask, and every output of the student is
finite; otherwise the teacher (the layer's own attention) serves and the cause is counted. The
runner loads the bundle on the workers (runner/distill/serving.py) and writes into job.json which
layers were routed and, per layer, how many calls the students served and how many fell back.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.models.attention_hook import LayerSet

READY = "ready"


@dataclass(frozen=True, kw_only=True)
class AttentionConfig:
    """students: a students folder (runner/distill/bundle.py); layers: "ready" or a layer set
    (core.models.attention_hook.LayerSet syntax) restricting which ready layers serve."""

    students: str
    layers: str = READY

    def __post_init__(self) -> None:
        if not self.students:
            raise ValueError("attention.students must name a students folder, got ''")
        if self.layers != READY:
            try:
                LayerSet.parse(self.layers)
            except ValueError as err:
                raise ValueError(f"attention.layers must be 'ready' or a layer set: {err}") from None

    def selection(self) -> LayerSet | None:
        """The layer set restricting the ready layers, None for all of them."""
        return None if self.layers == READY else LayerSet.parse(self.layers)
