"""Pack the training photos into a folder small enough to carry to a GPU host (64 MiB per call).

The 124 training PNGs are 82 MB; as JPEG quality 95 with 4:4:4 chroma (no subsampling, no resizing)
they are 28 MiB, and the compression error (40-52 dB PSNR, mean 46.8 dB over every tenth file,
measured once) sits far below what the TAEF2 latent keeps (28.6 dB round trip on butterfly,
tests/test_taef2.py).
The eval PNGs are copied byte for byte, so validation sees exactly the shared eval set.

    python bench/pack_training_images.py [--src /work/shared/assets/images] [--dst .carry/images]

Layout written: DST/train/<set>/<name>.jpg and DST/eval/<set>/<name>.png; tasks/train_reference.py
`load_images` reads either format.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from PIL import Image

JPEG_QUALITY = 95
LIMIT_BYTES = 40 * 1024 * 1024


def pack(src: Path, dst: Path) -> int:
    """Write the packed copy of src/train and src/eval under dst; return the total bytes written."""
    train_files = sorted((src / "train").rglob("*.png"))
    eval_files = sorted((src / "eval").rglob("*.png"))
    if not train_files or not eval_files:
        raise FileNotFoundError(f"no PNGs under {src}/train or {src}/eval")
    total = 0
    for path in train_files:
        out = dst / "train" / path.relative_to(src / "train").with_suffix(".jpg")
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as im:
            im.convert("RGB").save(out, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
        total += out.stat().st_size
    for path in eval_files:
        out = dst / "eval" / path.relative_to(src / "eval")
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out)
        total += out.stat().st_size
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--src", type=Path, default=Path("/work/shared/assets/images"))
    parser.add_argument("--dst", type=Path, default=Path(__file__).resolve().parents[1] / ".carry" / "images")
    args = parser.parse_args()
    if args.dst.exists():
        shutil.rmtree(args.dst)  # a stale file from an earlier layout must not travel
    total = pack(args.src, args.dst)
    n_train = len(list((args.dst / "train").rglob("*.jpg")))
    n_eval = len(list((args.dst / "eval").rglob("*.png")))
    print(f"packed {n_train} train JPEGs + {n_eval} eval PNGs into {args.dst}: {total / 2**20:.1f} MiB")
    if total > LIMIT_BYTES:
        raise SystemExit(f"packed size {total / 2**20:.1f} MiB exceeds {LIMIT_BYTES / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
