"""Random multi-scale square crops (and horizontal flips) of photos, for training the reference model.

A crop picks an image uniformly, a side s = crop * scale with the scale log-uniform in
[min_scale, min(max_scale, shorter side / crop)], a uniform position, and (optionally) a horizontal
flip with probability 1/2; the s x s patch is then resized to crop x crop with an antialiased
bilinear filter. A scale above 1 is the multi-scale augmentation (a wider field of view at the
model's native token count); scales below 1 would upsample and blur, so they are not allowed.

Decisions:
- Geometry is drawn first (`plan_crops`, a CropPlan of plain CPU integers) on one CPU generator
  keyed by a seed from core.flow.seeds, at a fixed shape per draw; pixels are cut afterwards
  (`extract_crops`) wherever the images live (uint8 on the GPU in training). So a crop set is a
  pure function of (seed, sizes), whatever the device, and a bank of crops can be rebuilt exactly
  on resume.
- Images too small for one crop at min_scale are skipped (never upsampled); a plan names images by
  their index in the full list.
- A fixed validation set is simply a plan with a fixed seed and flip=False (tasks/train_reference.py).
- Only horizontal flips: vertical flips make photos unnatural (sky below ground).
- The bilinear filter with antialias matches PIL's BILINEAR reduce for downscales (a triangle
  filter widened by the scale), so large crops are properly low-passed before they shrink.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from core.flow.seeds import cpu_generator


@dataclass(frozen=True)
class CropPlan:
    """Geometry of n crops, all [n] CPU tensors: image index, top, left, side (px), flip (bool)."""

    image: torch.Tensor
    top: torch.Tensor
    left: torch.Tensor
    side: torch.Tensor
    flip: torch.Tensor

    def __len__(self) -> int:
        return int(self.image.shape[0])

    def __getitem__(self, rows: slice) -> CropPlan:
        return CropPlan(self.image[rows], self.top[rows], self.left[rows], self.side[rows], self.flip[rows])


def plan_crops(
    sizes: Sequence[tuple[int, int]],
    n: int,
    seed: int,
    *,
    crop: int,
    min_scale: float = 1.0,
    max_scale: float = 1.0,
    flip: bool = True,
) -> CropPlan:
    """n random crops of images with the given (height, width) sizes, keyed by `seed` alone.

    The scale is log-uniform in [min_scale, min(max_scale, short / crop)]; side = round(crop * scale).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if crop < 1:
        raise ValueError(f"crop must be >= 1, got {crop}")
    if min_scale < 1.0:
        raise ValueError(f"min_scale must be >= 1 (no upsampling), got {min_scale}")
    if max_scale < min_scale:
        raise ValueError(f"max_scale must be >= min_scale ({min_scale}), got {max_scale}")
    smallest = math.ceil(crop * min_scale - 1e-9)
    eligible = [i for i, (h, w) in enumerate(sizes) if min(h, w) >= smallest]
    if not eligible:
        raise ValueError(
            f"no image has a shorter side >= {smallest} px (crop {crop} x min_scale {min_scale})"
        )
    hw = torch.tensor([sizes[i] for i in eligible], dtype=torch.float64)  # [m, 2]
    gen = cpu_generator(seed)
    u = torch.rand(n, 5, generator=gen, dtype=torch.float64)  # image, scale, top, left, flip
    pick = (u[:, 0] * len(eligible)).long().clamp(max=len(eligible) - 1)
    h, w = hw[pick, 0], hw[pick, 1]
    short = torch.minimum(h, w)
    lo = math.log(min_scale)
    hi = torch.log((short / crop).clamp(max=max_scale)).clamp(min=lo)
    side = (crop * torch.exp(lo + u[:, 1] * (hi - lo))).round().clamp(min=smallest)
    side = torch.minimum(side, short)
    top = (u[:, 2] * (h - side + 1)).floor().clamp(max=h - side)
    left = (u[:, 3] * (w - side + 1)).floor().clamp(max=w - side)
    flips = (u[:, 4] < 0.5) if flip else torch.zeros(n, dtype=torch.bool)
    image = torch.tensor(eligible, dtype=torch.int64)[pick]
    return CropPlan(image, top.long(), left.long(), side.long(), flips)


def extract_crops(images: Sequence[torch.Tensor], plan: CropPlan, *, crop: int) -> torch.Tensor:
    """Cut and resize the planned crops: float32 [n, 3, crop, crop] in [0, 1] on the images' device.

    images: [3, H, W] uint8 (0..255) or float in [0, 1], all on one device.
    """
    device = images[0].device
    out = torch.empty(len(plan), 3, crop, crop, device=device, dtype=torch.float32)
    rows = zip(
        plan.image.tolist(),
        plan.top.tolist(),
        plan.left.tolist(),
        plan.side.tolist(),
        plan.flip.tolist(),
        strict=True,
    )
    for i, (k, top, left, side, flip) in enumerate(rows):
        patch = images[k][:, top : top + side, left : left + side]
        patch = patch.float() / 255.0 if patch.dtype == torch.uint8 else patch.float()
        if side != crop:
            patch = F.interpolate(patch[None], size=(crop, crop), mode="bilinear", antialias=True)[0]
        out[i] = patch.flip(-1) if flip else patch
    # Bilinear weights are non-negative and sum to 1, so this only removes float rounding at the edges.
    return out.clamp_(0.0, 1.0)


def bank_batch(bank_size: int, batch: int, seed: int) -> torch.Tensor:
    """`batch` distinct indices into a bank of `bank_size` crops (CPU int64), keyed by `seed` alone."""
    if not 1 <= batch <= bank_size:
        raise ValueError(f"batch must be in [1, bank_size={bank_size}], got {batch}")
    return torch.randperm(bank_size, generator=cpu_generator(seed))[:batch]
