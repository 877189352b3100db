"""TAEF2 (core/vae/taef2.py) and its TinyVae adapter: strict load, checksums, shapes, round trip.

The PSNR thresholds: every eval image >= 27 dB, mean >= 28 dB. Butterfly's 28.58 dB is what an
independent NumPy reimplementation of the same architecture and weights gave (docs/vae.md), a
check of the wiring that a mis-wired layer would not pass. Run with -s to see the per-image table.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.vae import taef2
from core.vae.adapters import TinyVae
from runner.models import WEIGHTS

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("TESSERA_ASSETS", REPO.parent / "shared" / "assets"))
EVAL_DIRS = ("kodak", "set5")
TAEF2_DIR = Path(WEIGHTS.taef2)


def load_image(path: Path, multiple: int = 8) -> torch.Tensor:
    """[1, 3, H, W] float32 in [0, 1], centre-cropped to multiples of `multiple` (never resized)."""
    x = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
    h, w = x.shape[-2] // multiple * multiple, x.shape[-1] // multiple * multiple
    y0, x0 = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    return x[None, :, y0 : y0 + h, x0 : x0 + w].contiguous()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / (a - b).square().mean()))


@pytest.fixture(scope="module")
def modules() -> tuple[taef2.Taef2Encoder, taef2.Taef2Decoder]:
    return taef2.load_taef2(TAEF2_DIR)


def test_state_dicts_load_strictly() -> None:
    for module, name in (
        (taef2.Taef2Encoder(), taef2.ENCODER_FILE),
        (taef2.Taef2Decoder(), taef2.DECODER_FILE),
    ):
        state = torch.load(TAEF2_DIR / name, map_location="cpu", weights_only=True)
        assert len(state) == 79  # 79 tensors in each upstream file
        assert all(v.dtype == torch.float16 for v in state.values())
        result = module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        assert result.missing_keys == [] and result.unexpected_keys == []
        assert set(module.state_dict()) == set(state)


def test_expected_keys_exist() -> None:
    keys = set(taef2.Taef2Encoder().state_dict())
    assert {"0.weight", "1.conv.0.weight", "1.conv.4.bias", "13.pool.0.weight", "13.pool.1.bias"} <= keys
    assert {"13.pool.3.weight", "14.weight", "14.bias"} <= keys
    assert "3.pool.1.weight" in taef2.Taef2Decoder().state_dict()


def test_checksums_of_the_copied_files(tmp_path: Path) -> None:
    taef2.verify_taef2_checksums(TAEF2_DIR)
    for name in (taef2.ENCODER_FILE, taef2.DECODER_FILE):
        (tmp_path / name).write_bytes((TAEF2_DIR / name).read_bytes())
    taef2.verify_taef2_checksums(tmp_path)
    data = bytearray((tmp_path / taef2.DECODER_FILE).read_bytes())
    data[-100] ^= 1
    (tmp_path / taef2.DECODER_FILE).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="taef2_decoder.pth"):
        taef2.verify_taef2_checksums(tmp_path)
    with pytest.raises(ValueError, match="taef2_decoder.pth"):
        taef2.load_taef2(tmp_path)
    (tmp_path / taef2.ENCODER_FILE).unlink()
    with pytest.raises(ValueError, match="taef2_encoder.pth"):
        taef2.verify_taef2_checksums(tmp_path)


def test_shapes_and_adapter_shift_scale(modules) -> None:
    encoder, decoder = modules
    images = torch.rand(1, 3, 48, 80, generator=torch.Generator().manual_seed(0))
    vae = TinyVae(encoder, decoder)
    assert (vae.latent_channels, vae.scale_factor) == (32, 8)
    z = vae.encode(images)
    assert z.shape == (1, 32, 6, 10) and z.dtype == torch.float32
    out = vae.decode(z)
    assert out.shape == (1, 3, 48, 80) and float(out.min()) >= 0.0 and float(out.max()) <= 1.0

    standardised = TinyVae(encoder, decoder, shift=0.25, scale=2.0)
    torch.testing.assert_close(standardised.encode(images), (z - 0.25) * 2.0)
    torch.testing.assert_close(standardised.decode((z - 0.25) * 2.0), out, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="scale must be > 0"):
        TinyVae(encoder, decoder, scale=0.0)


def test_round_trip_psnr_on_eval_photos(modules) -> None:
    if not ASSETS.is_dir():
        pytest.skip(f"shared assets not found at {ASSETS} (set TESSERA_ASSETS)")
    paths = sorted(p for d in EVAL_DIRS for p in (ASSETS / "images" / "eval" / d).glob("*.png"))
    assert len(paths) == 9
    vae = TinyVae(*modules)
    rows, start = [], time.perf_counter()
    for path in paths:
        images = load_image(path)
        rows.append(
            (
                f"{path.parent.name}/{path.name}",
                tuple(images.shape[-2:]),
                psnr(vae.decode(vae.encode(images)), images),
            )
        )
    print(
        f"\nTAEF2 round trip ({time.perf_counter() - start:.1f} s)\n{'image':<22}{'H x W':>12}{'PSNR dB':>10}"
    )
    for name, (h, w), value in rows:
        print(f"{name:<22}{f'{h} x {w}':>12}{value:>10.2f}")
    values = [value for _, _, value in rows]
    print(f"{'mean':<34}{np.mean(values):>10.2f}")
    assert min(values) >= 27.0
    assert np.mean(values) >= 28.0
    butterfly = dict((name, value) for name, _, value in rows)["set5/butterfly.png"]
    assert abs(butterfly - 28.58) < 0.05  # the independent NumPy reimplementation
