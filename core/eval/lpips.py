"""LPIPS with an AlexNet trunk: the learned perceptual image distance of Zhang et al. 2018.

Zhang, Isola, Efros, Shechtman & Wang, "The Unreasonable Effectiveness of Deep Features as a
Perceptual Metric", CVPR 2018, arXiv:1801.03924, eq. 1, as released in version 0.1 of the authors'
package. For images x, x0 and trunk layers l = 1..5 (the outputs of relu1..relu5):

    d(x, x0) = sum_l  1 / (H_l W_l)  sum_{h, w}  sum_c  w_lc (yhat_lhwc - yhat0_lhwc)^2

    yhat_lhw = y_lhw / (||y_lhw||_2 + 1e-10)       (unit length over the channels, per position)
    y_l      = AlexNet_l((x' - shift) / scale),     x' = 2 x - 1 in [-1, 1]

with shift = (-.030, -.088, -.188) and scale = (.458, .448, .450) per RGB channel, and w_l in R^C_l
the learned non-negative channel weights (a 1x1 convolution with one output and no bias, applied to
the squared difference; C_l = 64, 192, 384, 256, 256).

Decisions:
- Inputs are Tessera images in [0, 1] ([B, 3, H, W] or [3, H, W]); the module maps them to the
  [-1, 1] range the metric is defined on (x' = 2x - 1, what the reference package does with
  `normalize=True`). An image far outside [0, 1] (a [-1, 1] or [0, 255] tensor passed by mistake)
  is refused rather than scored.
- The trunk is torchvision's AlexNet `features` (the "one weird trick" variant of Krizhevsky 2014,
  arXiv:1404.5997) up to and including relu5, with the same module indices, so the `features.N.*`
  tensors of a torchvision AlexNet state dict load unchanged. The heads are `lin{l}.model.1.weight`,
  the keys of the v0.1 head file; index 0 of `model` holds the training-time dropout of the reference
  package, an identity at evaluation. The scaling constants are non-persistent buffers, so the state
  dict holds exactly the trunk and head tensors. They are float32 numbers (-0.030 is stored as
  -0.0299999993...), as in the reference package, and keep those values in a float64 module.
- Weights come in as state dicts; finding, hashing and loading files is the runner's job. A module
  built without them has random weights and is for tests only.
- The ReLUs are not in place (torchvision's are): same values, and gradients to the inputs stay
  valid when the distance is used as a loss.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

ALEX_CHANNELS = (64, 192, 384, 256, 256)
# Indices in `features` whose outputs are relu1..relu5 (torchvision's AlexNet layout; the final
# max-pool, index 12, is not part of the metric).
RELU_TAPS = (1, 4, 7, 9, 11)
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10
# Smallest image side the trunk accepts: conv1 (k11 s4 p2) and two 3/2 max-pools leave 1x1 at 31 px.
MIN_SIDE = 31
# Decoders round slightly outside [0, 1]; a [-1, 1] or [0, 255] image is far outside this slack.
RANGE_SLACK = 1e-3


def alexnet_features() -> nn.Sequential:
    """torchvision's AlexNet `features`, indices 0..11 (conv1 .. relu5), randomly initialised."""
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(256, 256, kernel_size=3, padding=1),
        nn.ReLU(),
    )


class LinearHead(nn.Module):
    """One layer's channel weights w_l: a 1x1 convolution C -> 1 without bias (keys `model.1.weight`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _unit_normalise(y: torch.Tensor) -> torch.Tensor:
    """y / (||y||_2 over channels + 1e-10), per position."""
    return y / (torch.sqrt(torch.sum(y**2, dim=1, keepdim=True)) + NORM_EPS)


class LpipsAlex(nn.Module):
    """LPIPS-Alex v0.1: (a, b) images in [0, 1] -> per-layer distances [B, 5] or the distance [B]."""

    def __init__(self) -> None:
        super().__init__()
        self.features = alexnet_features()
        self.lin0, self.lin1, self.lin2, self.lin3, self.lin4 = (LinearHead(c) for c in ALEX_CHANNELS)
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)

    @property
    def heads(self) -> tuple[LinearHead, ...]:
        return (self.lin0, self.lin1, self.lin2, self.lin3, self.lin4)

    def _prepare(self, img: torch.Tensor, name: str) -> torch.Tensor:
        """[3, H, W] or [B, 3, H, W] in [0, 1] -> the scaled trunk input, in the weights' dtype."""
        if img.dim() == 3:
            img = img.unsqueeze(0)
        if img.dim() != 4 or img.shape[1] != 3:
            raise ValueError(f"{name} must be [B, 3, H, W] or [3, H, W], got shape {tuple(img.shape)}")
        if min(img.shape[-2:]) < MIN_SIDE:
            raise ValueError(f"{name} must be at least {MIN_SIDE}x{MIN_SIDE} px, got {tuple(img.shape[-2:])}")
        lo, hi = img.min().item(), img.max().item()
        if lo < -RANGE_SLACK or hi > 1 + RANGE_SLACK:
            raise ValueError(f"{name} must hold an image in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
        img = img.to(self.shift.dtype)
        signed = 2 * img - 1  # [0, 1] -> [-1, 1], the range LPIPS is defined on
        return (signed - self.shift) / self.scale

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """relu1..relu5 activations of the trunk."""
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in RELU_TAPS:
                taps.append(x)
        return taps

    def layer_distances(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """[B, 5]: the term of each trunk layer in d(a, b); their sum is the distance."""
        xa, xb = self._prepare(a, "a"), self._prepare(b, "b")
        if xa.shape != xb.shape:
            raise ValueError(f"images must have equal shapes, got {tuple(xa.shape)} and {tuple(xb.shape)}")
        terms = []
        for ya, yb, head in zip(self._taps(xa), self._taps(xb), self.heads, strict=True):
            diff = (_unit_normalise(ya) - _unit_normalise(yb)) ** 2  # [B, C_l, H_l, W_l]
            terms.append(head(diff).mean(dim=(2, 3)))  # [B, 1]
        return torch.cat(terms, dim=1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """d(a, b) per image, [B]."""
        terms = self.layer_distances(a, b)
        total = terms[:, 0]
        for k in range(1, terms.shape[1]):  # summed in layer order, as the reference package does
            total = total + terms[:, k]
        return total


def trunk_state_dict(alexnet: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The `features.*` tensors of a torchvision AlexNet state dict (its `classifier.*` is not used)."""
    trunk = {k: v for k, v in alexnet.items() if k.startswith("features.")}
    if not trunk:
        some = sorted(alexnet)[:4]
        raise ValueError(
            f"backbone state dict has no 'features.*' keys (torchvision AlexNet layout); got {some}"
        )
    return trunk


def build_lpips_alex(
    backbone: Mapping[str, torch.Tensor],
    heads: Mapping[str, torch.Tensor],
    *,
    device: str | torch.device = "cpu",
) -> LpipsAlex:
    """LPIPS-Alex from a torchvision AlexNet state dict and the v0.1 head state dict, frozen, in eval mode.

    Both are loaded strictly: a missing, extra or misshapen tensor raises (naming the key).
    """
    model = LpipsAlex()
    model.load_state_dict({**trunk_state_dict(backbone), **heads}, strict=True)
    return model.eval().requires_grad_(False).to(device)


def lpips_distance(model: LpipsAlex, a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over the batch of d(a, b), as a float (the convention of core.eval.metrics)."""
    with torch.no_grad():
        return model(a, b).mean().item()
