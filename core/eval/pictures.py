"""Small pictures for job artifacts: bar charts (latent statistics against N(0, 1)), latent previews,
a grid of labelled panels, and the comparison picture (overviews and 1:1 crops).

Everything returns uint8 numpy arrays [H, W, 3]; writing them to disk is the runner's job.

Decisions:
- No matplotlib. Shapes are drawn with Pillow's ImageDraw and text with Pillow's built-in bitmap
  font (`ImageFont.load_default_imagefont`, no font file), so a picture is the same on any host
  whether or not FreeType is installed. Pillow is the one import here beyond torch/numpy/stdlib.
- The latent preview is a linear map fitted per job (least squares of the area-downsampled input
  image on the latent channels), not a table of per-model constants, so it works for any VAE.
- Panels are brought to a common height with nearest-neighbour resampling: previews stay blocky
  instead of looking smoother (or sharper) than the data they show.
- Pictures are large enough to judge: previews and comparison overviews are at least
  `MIN_PICTURE_SIDE` pixels on their long side (integer nearest upscales). A comparison also shows
  crops at 1:1 (one image pixel per screen pixel) of the window with the most detail (the largest
  sum of squared luminance gradients), because an overview of a large result is downscaled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
BAR_RGB = (70, 130, 180)
AXIS_RGB = (90, 90, 90)
WHISKER_RGB = (200, 40, 40)
REFERENCE_RGB = (0, 140, 70)
OUTLINE_RGB = (230, 30, 30)
TEXT_PAD = 2
MIN_PICTURE_SIDE = 512
MAX_OVERVIEW_SIDE = 1024
CROP_SIDE = 256
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default_imagefont()


def _text_size(draw: ImageDraw.ImageDraw, text: str) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=_font())
    return right - left, bottom - top


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def bar_chart(
    values: Sequence[float],
    *,
    errors: Sequence[float] | None = None,
    labels: Sequence[str] | None = None,
    title: str = "",
    size: tuple[int, int] = (320, 640),
    reference: Sequence[tuple[float, str]] = (),
) -> np.ndarray:
    """Vertical bars from a zero line, uint8 [height, width, 3] with size = (height, width).

    errors: optional non-negative half-lengths (e.g. std) drawn as whiskers value +- error. Values may
    be negative; the value axis always includes 0 and is annotated with its top, 0 and bottom. Tick
    labels are drawn for every k-th bar, with the smallest k at which they do not overlap.
    reference: (value, label) pairs drawn as dashed horizontal lines across the plot, labelled at
    their right end; the value axis includes them.
    """
    vals = [float(v) for v in values]
    n = len(vals)
    errs = [0.0] * n if errors is None else [float(e) for e in errors]
    height, width = size
    if n == 0:
        raise ValueError("values must not be empty")
    if len(errs) != n or (labels is not None and len(labels) != n):
        raise ValueError(f"errors and labels need {n} entries, got {len(errs)} and {len(labels or [])}")
    if not all(math.isfinite(v) for v in vals + errs) or min(errs) < 0:
        raise ValueError(f"values must be finite and errors finite and >= 0, got {vals} and {errs}")
    if height < 64 or width < 64 + 2 * n:
        raise ValueError(f"size (height, width) = {size} is too small for {n} bars")

    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    _, line_h = _text_size(draw, "0")
    refs = [(float(v), str(text)) for v, text in reference]
    if not all(math.isfinite(v) for v, _ in refs):
        raise ValueError(f"reference values must be finite, got {[v for v, _ in refs]}")
    lo = min(0.0, *(v - e for v, e in zip(vals, errs, strict=True)), *(v for v, _ in refs))
    hi = max(0.0, *(v + e for v, e in zip(vals, errs, strict=True)), *(v for v, _ in refs))
    if hi == lo:
        hi = 1.0
    # Plot area: title band on top, tick-label band below, value annotations on the left.
    top = TEXT_PAD + (line_h + 2 * TEXT_PAD if title else 0) + line_h // 2
    bottom = height - 1 - (line_h + 2 * TEXT_PAD if labels is not None else TEXT_PAD) - line_h // 2
    left = max(_text_size(draw, _fmt(v))[0] for v in (lo, hi, 0.0)) + 3 * TEXT_PAD
    right = width - 1 - TEXT_PAD

    def row(v: float) -> int:
        return round(top + (hi - v) / (hi - lo) * (bottom - top))

    zero = row(0.0)
    slot = (right - left) / n
    for i, (v, e) in enumerate(zip(vals, errs, strict=True)):
        x0 = round(left + i * slot + 0.15 * slot)
        x1 = max(round(left + (i + 1) * slot - 0.15 * slot) - 1, x0)
        if v != 0:
            y_val = row(v)
            draw.rectangle((x0, min(y_val, zero), x1, max(y_val, zero)), fill=BAR_RGB)
        if e > 0:
            xc, cap = (x0 + x1) // 2, max((x1 - x0) // 4, 1)
            y_hi, y_lo = row(v + e), row(v - e)
            draw.line((xc, y_hi, xc, y_lo), fill=WHISKER_RGB)
            draw.line((xc - cap, y_hi, xc + cap, y_hi), fill=WHISKER_RGB)
            draw.line((xc - cap, y_lo, xc + cap, y_lo), fill=WHISKER_RGB)
    draw.line((left, zero, right, zero), fill=AXIS_RGB)
    draw.line((left - 1, top, left - 1, bottom), fill=AXIS_RGB)
    for v, text in refs:
        y = row(v)
        for x in range(left, right, 8):  # dashed: 5 on, 3 off
            draw.line((x, y, min(x + 4, right), y), fill=REFERENCE_RGB)
        tw, th = _text_size(draw, text)
        draw.text(
            (right - tw, y - th - TEXT_PAD if y - th - TEXT_PAD > top else y + TEXT_PAD),
            text,
            fill=REFERENCE_RGB,
            font=_font(),
        )

    _annotate(
        draw,
        lo=lo,
        hi=hi,
        row=row,
        left=left,
        bottom=bottom,
        width=width,
        slot=slot,
        title=title,
        labels=labels,
    )
    return np.asarray(img, dtype=np.uint8).copy()


def _annotate(
    draw: ImageDraw.ImageDraw,
    *,
    lo: float,
    hi: float,
    row: Callable[[float], int],
    left: int,
    bottom: int,
    width: int,
    slot: float,
    title: str,
    labels: Sequence[str] | None,
) -> None:
    """A bar chart's text: the value axis (0, and its ends where they clear the 0), the title centred
    on top, and tick labels under every k-th bar (the smallest k at which they do not overlap)."""
    _, line_h = _text_size(draw, "0")
    zero = row(0.0)
    font = _font()
    # Annotate 0, and the axis ends unless they would overlap the "0".
    for v in [0.0] + [u for u in (lo, hi) if abs(row(u) - zero) >= line_h]:
        text = _fmt(v)
        tw, th = _text_size(draw, text)
        draw.text((left - 2 * TEXT_PAD - tw, row(v) - th // 2), text, fill=INK, font=font)
    if title:
        tw, _ = _text_size(draw, title)
        draw.text((max((width - tw) // 2, 0), TEXT_PAD), title, fill=INK, font=font)
    if labels is not None:
        widest = max(_text_size(draw, str(s))[0] for s in labels) + TEXT_PAD
        step = max(1, math.ceil(widest / slot))
        for i in range(0, len(labels), step):
            tw, _ = _text_size(draw, str(labels[i]))
            xc = left + (i + 0.5) * slot
            draw.text(
                (round(xc - tw / 2), bottom + line_h // 2 + TEXT_PAD), str(labels[i]), fill=INK, font=font
            )


def latent_stats_chart(
    mean: Sequence[float], std: Sequence[float], *, title: str, size: tuple[int, int] = (360, 720)
) -> np.ndarray:
    """Per-channel mean +- std of a latent, channels labelled by index, against N(0, 1): a latent
    the model expects has every bar near the zero line and every whisker near the dashed +-1 lines."""
    return bar_chart(
        mean,
        errors=std,
        labels=[str(i) for i in range(len(mean))],
        title=f"{title}; dashed: N(0, 1)",
        size=size,
        reference=[(1.0, "N(0,1) +1 std"), (-1.0, "N(0,1) -1 std")],
    )


@dataclass(frozen=True, kw_only=True)
class LatentPreview:
    """Linear latent-to-RGB map: rgb[:, y, x] = weight @ latent[:, y, x] + bias, weight [3, C], bias [3]."""

    weight: torch.Tensor
    bias: torch.Tensor

    def __post_init__(self) -> None:
        if self.weight.dim() != 2 or self.weight.shape[0] != 3:
            raise ValueError(f"weight must be [3, C], got shape {tuple(self.weight.shape)}")
        if tuple(self.bias.shape) != (3,):
            raise ValueError(f"bias must be [3], got shape {tuple(self.bias.shape)}")


def fit_latent_preview(latent: torch.Tensor, image: torch.Tensor, *, ridge: float = 1e-6) -> LatentPreview:
    """Least-squares latent -> RGB map from one (latent [1, C, h, w], image [1, 3, H, W]) pair.

    The image is area-downsampled to the latent grid (h, w), then [W | b] minimises
    sum ||W z + b - rgb||^2 + lambda ||W||_F^2 over latent pixels z, with lambda = ridge times the mean
    of diag(Z^T Z) (scale-free; the bias is not penalised). The ridge keeps the normal equations
    solvable when channels are collinear. Solved in float64; returned float32 on the latent's device.
    """
    if latent.dim() != 4 or latent.shape[0] != 1:
        raise ValueError(f"latent must be [1, C, h, w], got shape {tuple(latent.shape)}")
    if image.dim() != 4 or image.shape[:2] != (1, 3):
        raise ValueError(f"image must be [1, 3, H, W], got shape {tuple(image.shape)}")
    h, w = latent.shape[-2:]
    if image.shape[-2] < h or image.shape[-1] < w:
        raise ValueError(f"image {tuple(image.shape[-2:])} is smaller than the latent grid {(h, w)}")
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    target = F.interpolate(image.to(torch.float64), size=(h, w), mode="area")
    z = latent[0].to(torch.float64).flatten(1).T  # [N, C]
    rgb = target[0].to(z.device).flatten(1).T  # [N, 3]
    c = z.shape[1]
    x = torch.cat([z, z.new_ones(z.shape[0], 1)], dim=1)  # [N, C + 1]
    gram = x.T @ x
    lam = ridge * gram.diagonal()[:c].mean()
    gram[range(c), range(c)] += lam
    coef = torch.linalg.solve(gram, x.T @ rgb)  # [C + 1, 3]
    return LatentPreview(weight=coef[:c].T.to(torch.float32), bias=coef[c].to(torch.float32))


def preview_rgb(latent: torch.Tensor, preview: LatentPreview, *, upscale: int = 1) -> np.ndarray:
    """uint8 [h * upscale, w * upscale, 3] picture of latent [1, C, h, w] or [C, h, w], nearest-upscaled."""
    z = latent[0] if latent.dim() == 4 and latent.shape[0] == 1 else latent
    if z.dim() != 3 or z.shape[0] != preview.weight.shape[1]:
        raise ValueError(
            f"latent must be [1, C, h, w] or [C, h, w] with C = {preview.weight.shape[1]}, "
            f"got shape {tuple(latent.shape)}"
        )
    if upscale < 1:
        raise ValueError(f"upscale must be >= 1, got {upscale}")
    weight = preview.weight.to(device=z.device, dtype=torch.float32)
    bias = preview.bias.to(device=z.device, dtype=torch.float32)
    rgb = torch.einsum("kc,chw->hwk", weight, z.to(torch.float32)) + bias  # [h, w, 3]
    out = (rgb.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    if upscale > 1:
        out = out.repeat(upscale, axis=0).repeat(upscale, axis=1)
    return out


def preview_scale(height: int, width: int, min_side: int = MIN_PICTURE_SIDE) -> int:
    """The integer upscale that brings a (height, width) picture to at least min_side on its long side."""
    return max(1, math.ceil(min_side / max(height, width, 1)))


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """A float image [3, H, W] or [1, 3, H, W] in [0, 1] as uint8 [H, W, 3] (clamped, rounded)."""
    if image.ndim == 4:
        if image.shape[0] != 1:
            raise ValueError(f"one image at a time, got a batch of {image.shape[0]}")
        image = image[0]
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image tensors must be [3, H, W], got {tuple(image.shape)}")
    arr = image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return np.ascontiguousarray(arr)


def _check_rgb(images: Sequence[np.ndarray]) -> None:
    if len(images) == 0:
        raise ValueError("images must not be empty")
    for i, im in enumerate(images):
        if im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
            raise ValueError(f"images[{i}] must be uint8 [H, W, 3], got {im.dtype} {im.shape}")


def grid(
    images: Sequence[np.ndarray],
    *,
    cols: int | None = None,
    labels: Sequence[str] | None = None,
    pad: int = 8,
) -> np.ndarray:
    """Panels in rows of `cols` (default: all in one row), row-major, `pad` background pixels between
    and around, an optional label above each panel.

    Every panel is nearest-resized to the tallest image's height (aspect kept); a column is as wide
    as its widest panel, and panels sit at the top left of their cell.
    """
    _check_rgb(images)
    cols = len(images) if cols is None else cols
    if cols < 1 or pad < 0:
        raise ValueError(f"cols must be >= 1 and pad >= 0, got cols={cols}, pad={pad}")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"labels need {len(images)} entries, got {len(labels)}")
    height = max(im.shape[0] for im in images)
    panels = [
        np.asarray(
            Image.fromarray(im).resize(
                (max(1, round(im.shape[1] * height / im.shape[0])), height), Image.Resampling.NEAREST
            )
        )
        for im in images
    ]
    cols = min(cols, len(panels))
    rows = math.ceil(len(panels) / cols)
    col_w = [max(p.shape[1] for p in panels[c::cols]) for c in range(cols)]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_h = _text_size(probe, "Ag")[1] + 2 * TEXT_PAD if labels is not None else 0
    cell_h = label_h + height
    canvas = Image.new("RGB", (sum(col_w) + pad * (cols + 1), rows * cell_h + pad * (rows + 1)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for i, panel in enumerate(panels):
        r, c = divmod(i, cols)
        x, y = pad + sum(col_w[:c]) + c * pad, pad + r * (cell_h + pad)
        canvas.paste(Image.fromarray(panel), (x, y + label_h))
        if labels is not None:
            draw.text((x, y + TEXT_PAD), str(labels[i]), fill=INK, font=_font())
    return np.asarray(canvas, dtype=np.uint8).copy()


def detail_window(image: np.ndarray, side: int) -> tuple[int, int]:
    """(top, left) of the side x side window of uint8 image [H, W, 3] with the largest sum of squared
    luminance gradients (forward differences), on a grid of side // 4 strides; the first on ties."""
    _check_rgb([image])
    h, w = image.shape[:2]
    if not 1 <= side <= min(h, w):
        raise ValueError(f"window side must be in [1, {min(h, w)}], got {side}")
    y = torch.tensor(image, dtype=torch.float64) @ torch.tensor(LUMA, dtype=torch.float64)
    energy = torch.zeros(h, w, dtype=torch.float64)
    energy[:, :-1] += (y[:, 1:] - y[:, :-1]) ** 2
    energy[:-1, :] += (y[1:, :] - y[:-1, :]) ** 2
    stride = max(1, side // 4)
    sums = F.avg_pool2d(energy[None, None], kernel_size=side, stride=stride)[0, 0]
    r, c = divmod(int(sums.flatten().argmax()), sums.shape[1])
    return r * stride, c * stride


def _overview(image: np.ndarray, scale: float) -> np.ndarray:
    h, w = image.shape[:2]
    if scale >= 1:
        return image.repeat(int(scale), axis=0).repeat(int(scale), axis=1)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))


def comparison(
    images: Sequence[np.ndarray],
    labels: Sequence[str],
    *,
    detail_of: int = -1,
    crop: int = CROP_SIDE,
    pad: int = 8,
) -> np.ndarray:
    """Images of one size side by side, and below them their crops at 1:1 of the window with the
    most detail in images[detail_of] (outlined on the overviews).

    Overviews are scaled to a long side in [MIN_PICTURE_SIDE, MAX_OVERVIEW_SIDE]: integer nearest
    upscales for small images, area (box) downscales for large ones.
    """
    _check_rgb(images)
    if len(labels) != len(images) or len({im.shape for im in images}) != 1:
        raise ValueError(
            f"comparison needs one label per image and images of one size, got "
            f"{len(labels)} labels for {[im.shape for im in images]}"
        )
    h, w = images[0].shape[:2]
    side = min(crop, h, w)
    top, left = detail_window(images[detail_of], side)
    long = max(h, w)
    scale = float(preview_scale(h, w)) if long < MIN_PICTURE_SIDE else min(1.0, MAX_OVERVIEW_SIDE / long)
    overviews = []
    for im in images:
        view = Image.fromarray(_overview(im, scale))
        box = [round(v * scale) for v in (left, top, left + side, top + side)]
        ImageDraw.Draw(view).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), outline=OUTLINE_RGB, width=2)
        overviews.append(np.asarray(view))
    crops = [np.ascontiguousarray(im[top : top + side, left : left + side]) for im in images]
    rows = [
        grid(overviews, labels=labels, pad=pad),
        grid(crops, labels=[f"{text.split(':')[0]}, 1:1 crop" for text in labels], pad=pad),
    ]
    width = max(r.shape[1] for r in rows)
    canvas = np.full((sum(r.shape[0] for r in rows), width, 3), BACKGROUND, dtype=np.uint8)
    y = 0
    for r in rows:
        canvas[y : y + r.shape[0], : r.shape[1]] = r
        y += r.shape[0]
    return canvas
