"""LPIPS weights for jobs and reports: find, verify and load them, or say exactly why not.

LPIPS-Alex (core.eval.lpips) needs two files:
- the AlexNet trunk, torchvision's `alexnet-owt-7be5be79.pth` (244 MB, ImageNet weights). No package
  ships it; torchvision downloads it into the torch hub cache, `torch.hub.get_dir()/checkpoints/`
  ($TORCH_HOME/hub/checkpoints, TORCH_HOME defaulting to ~/.cache/torch). It is taken from a
  configured path, else from that cache, and accepted only if its SHA-256 equals the published
  digest (the file name carries its first 8 hex digits).
- the v0.1 linear heads `alex.pth` (6 KB) of the authors' `lpips` package (BSD-2-Clause), kept in
  this repository under models/lpips/ with its licence, also checked by SHA-256. The package itself
  is never imported: it imports torchvision.

Both are read with `torch.load(..., weights_only=True)`.

Policy, so that no number ever comes from random weights:
- `resolve_lpips` never raises for a missing or damaged file; it returns an `LpipsWeights` record
  that says whether LPIPS is available and, if not, why and which path it looked at.
- A job that asks for LPIPS calls `require_lpips` (or `lpips_column(..., required=True)`) before any
  work: an unavailable metric stops it with `LpipsUnavailableError` naming the path.
- A report (benchmark, distillation or controller quality table) calls `lpips_column(backbone)`
  once; `column.score(a, b)` is the distance, or None when LPIPS is not measured, and
  `column.record()` goes into the report ({"measured": false, "reason": ...} in that case).

Controller reward (the perceptual term). The routing controller scores a student trajectory's image
against the teacher's with reward = quality - cost, where the quality part includes
-w_p * LPIPS(student, teacher). Its job resolves LPIPS once at start with `perceptual_term(w_p,
column)`: when LPIPS is unavailable the effective weight is 0 (the reward keeps its other terms),
and the returned `PerceptualTerm.record()` ({"requested_weight", "weight", "measured", "reason"})
goes into job.json, so a run without the perceptual term says so. A job whose config makes the
term mandatory uses `require_lpips` instead and fails before work.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.eval.lpips import LpipsAlex, build_lpips_alex, lpips_distance
from runner.models import MODELS

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
ALEXNET_SHA256 = "7be5be791159472b1fbf3c69796f7cb30dca7ad8466c2df70058c37116cdee02"
HEADS_SHA256 = "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0"
# the built-in copy (runner/models.py says where the built-in weights are found)
REPO_HEADS = MODELS / "lpips" / "v0.1" / "alex.pth"
HASH_CHUNK = 1 << 20


class LpipsUnavailableError(ValueError):
    """A job asked for LPIPS and its weights are missing or do not match their published digest."""


def hub_checkpoint(name: str = ALEXNET_FILE) -> Path:
    """Where torchvision keeps a downloaded checkpoint: torch.hub.get_dir()/checkpoints/<name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True, kw_only=True)
class LpipsWeights:
    """Outcome of looking for the LPIPS weights; `available` is True only when both files verified."""

    available: bool
    reason: str  # "" when available
    backbone: Path
    backbone_source: str  # "configured" or "torch hub cache"
    heads: Path

    def record(self) -> dict[str, Any]:
        return {
            "measured": self.available,
            "reason": self.reason,
            "backbone": str(self.backbone),
            "backbone_source": self.backbone_source,
            "backbone_sha256": ALEXNET_SHA256 if self.available else None,
            "heads": str(self.heads),
            "heads_sha256": HEADS_SHA256 if self.available else None,
        }


def _check_file(path: Path, expected: str, what: str) -> str:
    """'' when path is a file with SHA-256 `expected`, else the reason it is not usable."""
    if not path.is_file():
        return f"{what} {str(path)!r} does not exist"
    actual = sha256_of(path)
    if actual != expected:
        return f"{what} {str(path)!r} has SHA-256 {actual}, expected {expected}"
    return ""


def resolve_lpips(backbone: str | Path | None = None, *, heads: str | Path | None = None) -> LpipsWeights:
    """Find and verify the LPIPS-Alex weights; never raises for a missing or mismatching file.

    backbone: the AlexNet checkpoint; None = the torch hub cache (`hub_checkpoint()`).
    heads: the v0.1 head file; None = the built-in copy (lpips/v0.1/alex.pth of runner.models.MODELS).
    """
    source = "torch hub cache" if backbone is None else "configured"
    backbone_path = hub_checkpoint() if backbone is None else Path(backbone).expanduser()
    heads_path = REPO_HEADS if heads is None else Path(heads).expanduser()
    problems = [
        _check_file(backbone_path, ALEXNET_SHA256, f"AlexNet backbone ({source})"),
        _check_file(heads_path, HEADS_SHA256, "LPIPS v0.1 heads"),
    ]
    reason = "; ".join(p for p in problems if p)
    return LpipsWeights(
        available=not reason, reason=reason, backbone=backbone_path, backbone_source=source, heads=heads_path
    )


def load_lpips(weights: LpipsWeights, device: str | torch.device = "cpu") -> LpipsAlex:
    """The frozen LPIPS-Alex module from verified weights; raises LpipsUnavailableError otherwise."""
    if not weights.available:
        raise LpipsUnavailableError(f"LPIPS is unavailable: {weights.reason}")
    trunk = torch.load(weights.backbone, map_location="cpu", weights_only=True)
    heads = torch.load(weights.heads, map_location="cpu", weights_only=True)
    return build_lpips_alex(trunk, heads, device=device)


def _unavailable(weights: LpipsWeights) -> LpipsUnavailableError:
    return LpipsUnavailableError(
        f"LPIPS was asked for but is unavailable: {weights.reason}. Put torchvision's "
        f"{ALEXNET_FILE} (SHA-256 {ALEXNET_SHA256}) there or pass its path."
    )


def require_lpips(backbone: str | Path | None = None, *, device: str | torch.device = "cpu") -> LpipsAlex:
    """For a job that asks for LPIPS: the loaded module, or LpipsUnavailableError before any work."""
    weights = resolve_lpips(backbone)
    if not weights.available:
        raise _unavailable(weights)
    return load_lpips(weights, device)


@dataclass(frozen=True)
class LpipsColumn:
    """LPIPS as a report column: distances when the weights resolved, "not measured" otherwise."""

    weights: LpipsWeights
    model: LpipsAlex | None

    @property
    def measured(self) -> bool:
        return self.model is not None

    def score(self, a: torch.Tensor, b: torch.Tensor) -> float | None:
        """Mean LPIPS distance of images a, b in [0, 1], or None when LPIPS is not measured."""
        if self.model is None:
            return None
        device = next(self.model.parameters()).device
        return lpips_distance(self.model, a.to(device), b.to(device))

    def record(self) -> dict[str, Any]:
        return self.weights.record()


def lpips_column(
    backbone: str | Path | None = None, *, required: bool = False, device: str | torch.device = "cpu"
) -> LpipsColumn:
    """Resolve LPIPS once for a report; required=True raises LpipsUnavailableError instead of skipping."""
    weights = resolve_lpips(backbone)
    if not weights.available:
        if required:
            raise _unavailable(weights)
        return LpipsColumn(weights, None)
    return LpipsColumn(weights, load_lpips(weights, device))


@dataclass(frozen=True, kw_only=True)
class PerceptualTerm:
    """The perceptual term of a reward: the weight actually used and why it may differ from the asked one."""

    requested_weight: float
    weight: float
    measured: bool
    reason: str

    def record(self) -> dict[str, Any]:
        return {
            "requested_weight": self.requested_weight,
            "weight": self.weight,
            "measured": self.measured,
            "reason": self.reason,
        }


def perceptual_term(requested_weight: float, column: LpipsColumn) -> PerceptualTerm:
    """The requested weight when LPIPS is measured, else weight 0 with the reason (for job.json)."""
    if requested_weight < 0:
        raise ValueError(f"perceptual weight must be >= 0, got {requested_weight}")
    measured = column.measured
    return PerceptualTerm(
        requested_weight=requested_weight,
        weight=requested_weight if measured else 0.0,
        measured=measured,
        reason=column.weights.reason,
    )
