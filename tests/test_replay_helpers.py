"""Shared pieces of the replay tests (no tests here): small seeded captures and tier directories."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from core.distill.capture import Capture, CaptureMeta

SHM = Path("/dev/shm")


def make_capture(
    i: int,
    layer: str = "single:0",
    *,
    n: int = 24,
    heads: int = 2,
    dim: int = 8,
    queries: int = 4,
    dtype: torch.dtype = torch.bfloat16,
) -> Capture:
    """Capture number i: seeded random tensors, with meta that names i (step = prompt_id = i)."""
    g = torch.Generator().manual_seed(1000 + i)

    def t(tokens: int) -> torch.Tensor:
        return (torch.randn(1, heads, tokens, dim, generator=g) * 3).to(dtype)

    text = 4
    side = int((n - text) ** 0.5)
    meta = CaptureMeta(
        layer=layer,
        step=i,
        sigma=1.0 / (1 + i),
        cfg=3.5,
        text_len=text,
        latent_h=side,
        latent_w=side,
        prompt_id=i,
        seed_id=7,
    )
    index = torch.linspace(0, n - 1, queries).round().long()
    return Capture(meta=meta, q_sub=t(queries), k=t(n), v=t(n), teacher_sub=t(queries), query_index=index)


def same_bits(a: Capture, b: Capture) -> bool:
    """Bit-exact equality of every tensor (NaN payloads and -0 included) and of the meta."""
    fields = ("q_sub", "k", "v", "teacher_sub")
    return (
        a.meta == b.meta
        and torch.equal(a.query_index, b.query_index)
        and all(
            getattr(a, f).dtype == getattr(b, f).dtype
            and torch.equal(getattr(a, f).view(torch.uint8), getattr(b, f).view(torch.uint8))
            for f in fields
        )
    )


def ram_tmpdir(prefix: str) -> Path:
    """A fresh directory on /dev/shm (the RAM tier as deployed), or under /tmp where there is none."""
    base = SHM if SHM.is_dir() else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def remove(*paths: Path) -> None:
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)
