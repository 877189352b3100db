"""Image quality metrics for upscale results: PSNR, SSIM, high-frequency energy, tile-seam visibility.

Images are float tensors in [0, 1], shaped [B, 3, H, W] or [3, H, W]. Every metric returns a plain
float: the mean over the batch of the per-image value.

Decisions:
- SSIM, the spectrum and the seam score work on luma Y = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601
  weights, full range [0, 1]). SR benchmarks score SSIM on Y; many use MATLAB's studio-range
  rgb2ycbcr (Y in [16, 235] / 255), which rescales Y by 219/255 and so changes the result slightly
  against the fixed constants C1, C2; numbers here are comparable only to full-range luma SSIM.
- Metrics are computed in float64 on the inputs' device. In float32 the local variance
  E[x^2] - mu^2 loses ~1e-7 absolute to cancellation, which is ~1e-4 relative against C2 = 9e-4 in
  flat regions; float64 keeps SSIM within 1e-6 of a direct two-pass reference.
- No scikit-image dependency: SSIM follows Wang et al. 2004 directly (Gaussian 11x11, sigma 1.5,
  valid convolution, as in the paper's reference MATLAB code), and the tests check it against an
  independent loop implementation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

LUMA_WEIGHTS = (0.299, 0.587, 0.114)
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def _as_batch(img: torch.Tensor, name: str) -> torch.Tensor:
    """[3, H, W] or [B, 3, H, W] -> [B, 3, H, W] in float64."""
    if img.dim() == 3:
        img = img.unsqueeze(0)
    if img.dim() != 4 or img.shape[1] != 3:
        raise ValueError(f"{name} must be [B, 3, H, W] or [3, H, W], got shape {tuple(img.shape)}")
    return img.to(torch.float64)


def _pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _as_batch(a, "a"), _as_batch(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"images must have equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    return a, b


def luminance(img: torch.Tensor) -> torch.Tensor:
    """BT.601 luma Y = 0.299 R + 0.587 G + 0.114 B, [B, 1, H, W] float64."""
    img = _as_batch(img, "img")
    w = img.new_tensor(LUMA_WEIGHTS).view(1, 3, 1, 1)
    return (img * w).sum(dim=1, keepdim=True)


def psnr(a: torch.Tensor, b: torch.Tensor, *, max_val: float = 1.0) -> float:
    """Mean over the batch of 10 log10(max_val^2 / MSE) per image; inf when any pair is identical."""
    if max_val <= 0:
        raise ValueError(f"max_val must be > 0, got {max_val}")
    a, b = _pair(a, b)
    mse = (a - b).pow(2).flatten(1).mean(dim=1)  # [B]
    per_image = [math.inf if m == 0 else 10 * math.log10(max_val**2 / m) for m in mse.tolist()]
    return sum(per_image) / len(per_image)


def _gaussian_blur_valid(x: torch.Tensor) -> torch.Tensor:
    """Valid-mode 11x11 Gaussian (sigma 1.5, sum 1) filter of x [N, 1, H, W], done as two 1-D passes."""
    r = SSIM_WINDOW // 2
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    g = torch.exp(-(t**2) / (2 * SSIM_SIGMA**2))
    g = g / g.sum()
    x = F.conv2d(x, g.view(1, 1, 1, -1))
    return F.conv2d(x, g.view(1, 1, -1, 1))


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Structural similarity of the luma, Wang, Bovik, Sheikh & Simoncelli 2004 (IEEE TIP 13(4)), eq. 13.

    SSIM = (2 mu_a mu_b + C1)(2 s_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(s_a^2 + s_b^2 + C2)) with local
    statistics under an 11x11 Gaussian window (sigma 1.5), C1 = (0.01 L)^2, C2 = (0.03 L)^2, L = 1,
    evaluated only where the window fits (valid convolution), averaged over the map, then the batch.
    """
    a, b = _pair(a, b)
    if min(a.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(
            f"ssim needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {tuple(a.shape[-2:])}"
        )
    ya, yb = luminance(a), luminance(b)
    n = ya.shape[0]
    # One filter call for all five local moments: [5B, 1, H, W].
    moments = _gaussian_blur_valid(torch.cat([ya, yb, ya * ya, yb * yb, ya * yb]))
    mu_a, mu_b, e_aa, e_bb, e_ab = moments.split(n)
    var_a, var_b = e_aa - mu_a * mu_a, e_bb - mu_b * mu_b
    cov = e_ab - mu_a * mu_b
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
    return (num / den).flatten(1).mean(dim=1).mean().item()


def _spectral_energy(y: torch.Tensor, cutoff: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Windowed spectral energy of y [B, 1, H, W] (above the radial cutoff, in total), each [B]."""
    h, w = y.shape[-2:]
    win = torch.outer(
        torch.hann_window(h, dtype=y.dtype, device=y.device),
        torch.hann_window(w, dtype=y.dtype, device=y.device),
    )
    spec = torch.fft.fft2((y - y.mean(dim=(-2, -1), keepdim=True)) * win)
    # fftfreq is in cycles per pixel; Nyquist is 0.5, so 2 * f is the fraction of Nyquist per axis.
    fy = 2 * torch.fft.fftfreq(h, dtype=y.dtype, device=y.device)
    fx = 2 * torch.fft.fftfreq(w, dtype=y.dtype, device=y.device)
    radius = torch.sqrt(fy.view(-1, 1) ** 2 + fx.view(1, -1) ** 2)  # [H, W]
    power = spec.real**2 + spec.imag**2
    return (power * (radius > cutoff)).flatten(1).sum(dim=1), power.flatten(1).sum(dim=1)


def high_frequency_ratio(img: torch.Tensor, reference: torch.Tensor, *, cutoff: float = 0.25) -> float:
    """Fine-detail energy of img relative to reference (same size); 1.0 = as much as the reference.

    Per image, on the luma Y: subtract its mean, multiply by a separable periodic Hann window (so the
    wrap-around step between opposite borders adds no broadband energy that both images share), take
    the 2-D DFT, and sum |F(ky, kx)|^2 over bins whose radius sqrt((2 fy)^2 + (2 fx)^2) > cutoff, with
    fy, fx the bin frequencies in cycles per pixel (so the radius is a fraction of Nyquist; the corner
    reaches sqrt(2)). The result is E_img / E_reference per image, averaged over the batch. Bicubic
    upscales score well below 1; invented texture or noise can score above 1.
    """
    if not 0 < cutoff < math.sqrt(2):
        raise ValueError(f"cutoff must be in (0, sqrt(2)) as a fraction of Nyquist, got {cutoff}")
    img, reference = _pair(img, reference)
    e_img, _ = _spectral_energy(luminance(img), cutoff)
    e_ref, total_ref = _spectral_energy(luminance(reference), cutoff)
    # Roundoff leaves ~1e-30 of "energy" above the cutoff of a band-limited reference: below 1e-12
    # of the reference's total windowed energy counts as none (and a flat reference has none).
    if bool((e_ref <= 1e-12 * total_ref).any()):
        raise ValueError(f"reference has no spectral energy above cutoff {cutoff}: {e_ref.tolist()}")
    return (e_img / e_ref).mean().item()


def seam_score(img: torch.Tensor, border_mask: torch.Tensor) -> float:
    """Mean squared luma gradient on tile-border pixels over that on all other pixels; 1.0 = no seams.

    Gradients are forward differences gx[i, j] = Y[i, j+1] - Y[i, j] and gy[i, j] = Y[i+1, j] - Y[i, j]
    on the (H-1) x (W-1) grid where both exist; |g|^2 = gx^2 + gy^2 is attributed to pixel (i, j), and
    border_mask [H, W] is cropped to that grid. A step between columns c-1 and c lands on pixel c-1,
    which a width-1 mask of an edge at c contains. When the off-border gradient is zero the score is
    1.0 if the border gradient is zero too, else inf. Batch: mean of the per-image scores.
    """
    y = luminance(img)[:, 0]  # [B, H, W]
    h, w = y.shape[-2:]
    if border_mask.shape != (h, w) or border_mask.dtype != torch.bool:
        raise ValueError(
            f"border_mask must be bool [{h}, {w}], got {border_mask.dtype} {tuple(border_mask.shape)}"
        )
    if h < 2 or w < 2:
        raise ValueError(f"seam_score needs an image of at least 2x2, got {h}x{w}")
    gx = y[:, :-1, 1:] - y[:, :-1, :-1]
    gy = y[:, 1:, :-1] - y[:, :-1, :-1]
    g2 = gx * gx + gy * gy  # [B, H-1, W-1]
    mask = border_mask[:-1, :-1].to(y.device)
    n_on = int(mask.sum())
    if n_on == 0 or n_on == mask.numel():
        raise ValueError(f"border_mask must mark some but not all of the {mask.numel()} pixels, marks {n_on}")
    on = g2[:, mask].mean(dim=1)
    off = g2[:, ~mask].mean(dim=1)
    scores = [
        (on_i / off_i) if off_i > 0 else (1.0 if on_i == 0 else math.inf)
        for on_i, off_i in zip(on.tolist(), off.tolist(), strict=True)
    ]
    return sum(scores) / len(scores)


def border_mask_from_boxes(
    height: int, width: int, boxes: Sequence[tuple[int, int, int, int]], *, width_px: int = 1
) -> torch.Tensor:
    """Bool [height, width]: pixels within width_px of an edge of a box (y0, x0, h, w) inside the image.

    An edge at y = e lies between rows e-1 and e; the rows e-width_px .. e+width_px-1 are marked
    (pixel centres closer than width_px to the edge), over the box's extent along the edge. Edges on
    the image border (y0 = 0, x0 = 0, y0 + h = height, x0 + w = width) are not seams and are skipped.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if width_px < 1:
        raise ValueError(f"width_px must be >= 1, got {width_px}")
    mask = torch.zeros(height, width, dtype=torch.bool)
    for box in boxes:
        y0, x0, h, w = box
        if h < 1 or w < 1 or y0 < 0 or x0 < 0 or y0 + h > height or x0 + w > width:
            raise ValueError(
                f"box (y0, x0, h, w) = {tuple(box)} is empty or outside the {height}x{width} image"
            )
        for e in (y0, y0 + h):
            if 0 < e < height:
                mask[max(e - width_px, 0) : e + width_px, x0 : x0 + w] = True
        for e in (x0, x0 + w):
            if 0 < e < width:
                mask[y0 : y0 + h, max(e - width_px, 0) : e + width_px] = True
    return mask


def channel_stats(latent: torch.Tensor) -> dict[str, list[float]]:
    """Per-channel {"mean": [C], "std": [C]} of latent [B, C, h, w] over batch and space (population std).

    A plain dict because it goes straight into the latent-statistics artifact JSON.
    """
    if latent.dim() != 4:
        raise ValueError(f"latent must be [B, C, h, w], got shape {tuple(latent.shape)}")
    x = latent.to(torch.float64).transpose(0, 1).flatten(1)  # [C, B*h*w]
    return {"mean": x.mean(dim=1).tolist(), "std": x.std(dim=1, correction=0).tolist()}
