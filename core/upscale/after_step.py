"""One phase of tiled denoising, composed from plans around an injected `evaluate`.

    v(x, sigma, k) = (1 - c2) * local.fuse(...) + c2 * global.fuse(...)     (DemoFusion, arXiv 2311.16973)
    after step k:  x <- skip-residual mix with z'_{k+1}  (at the same sigma)
                   x <- A_k * x + (1 - A_k) * z'_{k+1}   (exact per-tile denoise pinning)
                   x <- m * x + (1 - m) * z'_{k+1}        (inpaint mask: outside follows the reference)

z'_sigma = (1 - sigma) u + sigma eps is the noise-inverted reference of the phase: u is the resized
input latent and eps the phase's one noise tensor (docs/upscale.md). All views of a step (local
tiles and global sub-lattices) go to `evaluate` in ONE call, so one step is one barrier across the
pool.

Step indices are positions in the phase's FULL schedule (an img2img pass that starts at index s sees
steps s..N-1), so per-tile start steps and Spot shifts mean the same in every pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from core.flow.schedules import noise_to
from core.tiling.tile_plans import pin_to_reference
from core.upscale.skip_residual import mix_with_reference


@dataclass(frozen=True)
class Reference:
    """The inversion trajectory z'_sigma = (1 - sigma) u + sigma eps of a phase."""

    u: torch.Tensor
    eps: torch.Tensor

    def at(self, sigma: float) -> torch.Tensor:
        return noise_to(self.u, self.eps, sigma)


def make_after_step(
    sigmas: Sequence[float],
    reference: Reference,
    *,
    first_step: int,
    skip_weights: Sequence[float] | None = None,
    blend: str = "addition",
    activity: Callable[[int], torch.Tensor] | None = None,
    mask: torch.Tensor | None = None,
) -> Callable[[torch.Tensor, int], torch.Tensor] | None:
    """The after-step hook of a phase; `sigmas` is the FULL schedule, skip_weights indexed from first_step."""
    if skip_weights is None and activity is None and mask is None:
        return None

    def after_step(x: torch.Tensor, step: int) -> torch.Tensor:
        z_next = reference.at(sigmas[step + 1]).to(x.dtype)
        if skip_weights is not None:
            w = skip_weights[step - first_step]
            if w > 0:
                x = mix_with_reference(x, z_next, w, blend)
        if activity is not None:
            x = pin_to_reference(x, activity(step), z_next)
        if mask is not None:
            x = pin_to_reference(x, mask, z_next)
        return x

    return after_step
