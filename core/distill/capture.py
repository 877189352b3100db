"""The capture record: what one teacher attention call leaves for its layer's student to learn from.

A capture keeps a subsample of the queries with the teacher's outputs for them, and the FULL keys
and values. The student's output for any query depends on every key (a linear-attention student
sums phi(k_j) v_j^T and phi(k_j) over all j), so subsampling keys would bias the target; queries
and their teacher rows can be subsampled freely.

Shapes (B batch, H heads, N tokens of the joint text + image sequence, Nq kept queries, D head
dim), all four tensors of one dtype (bf16, fp16 or fp32) on one device:

    q_sub        [B, H, Nq, D]   post-RoPE queries at `query_index`
    k, v         [B, H, N,  D]   post-RoPE keys and values, every token
    teacher_sub  [B, H, Nq, D]   the teacher's attention output at `query_index`
    query_index  [Nq] int64      positions in 0..N-1 (q_sub[:, :, i] = q[:, :, query_index[i]])

The scalars say where the call sat in a run: the layer key ("double:0", "single:3"), the sampler
step and sigma, the guidance scale, the true text length (padded text tokens may follow it), the
latent size in tokens (h x w image tokens follow the text, so text_len + h*w <= N), and which
prompt and seed produced it. The replay store adds the insertion order and the times sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The dtypes a capture may hold, by the name the shard files record.
CAPTURE_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in CAPTURE_DTYPES.items()}
TENSOR_FIELDS = ("q_sub", "k", "v", "teacher_sub")


@dataclass(frozen=True, kw_only=True)
class CaptureMeta:
    """Where a capture came from (one attention call of one denoising step)."""

    layer: str
    step: int
    sigma: float
    cfg: float
    text_len: int
    latent_h: int
    latent_w: int
    prompt_id: int
    seed_id: int

    def __post_init__(self) -> None:
        if not self.layer or any(c.isspace() or c == "/" for c in self.layer):
            raise ValueError(
                f"capture layer must be a non-empty key without spaces or '/', got {self.layer!r}"
            )
        if self.step < 0:
            raise ValueError(f"capture step must be >= 0, got {self.step}")
        if not self.sigma >= 0:  # also rejects NaN
            raise ValueError(f"capture sigma must be >= 0, got {self.sigma}")
        if self.text_len < 0:
            raise ValueError(f"capture text_len must be >= 0, got {self.text_len}")
        if self.latent_h < 1 or self.latent_w < 1:
            raise ValueError(f"capture latent h x w must be >= 1 x 1, got {self.latent_h} x {self.latent_w}")


@dataclass(frozen=True, kw_only=True, eq=False)
class Capture:
    """One capture: the tensors above and their `CaptureMeta`. Validated on construction."""

    meta: CaptureMeta
    q_sub: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    teacher_sub: torch.Tensor
    query_index: torch.Tensor

    def __post_init__(self) -> None:
        tensors = {name: getattr(self, name) for name in TENSOR_FIELDS}
        for name, t in tensors.items():
            if t.dim() != 4:
                raise ValueError(f"capture {name} must be [B, H, n, D], got shape {tuple(t.shape)}")
            if t.dtype not in DTYPE_NAMES:
                raise ValueError(f"capture {name} dtype must be one of {list(CAPTURE_DTYPES)}, got {t.dtype}")
        if len({t.dtype for t in tensors.values()}) != 1 or len({t.device for t in tensors.values()}) != 1:
            raise ValueError(
                "capture tensors must share one dtype and device, got "
                + ", ".join(f"{n}={t.dtype}@{t.device}" for n, t in tensors.items())
            )
        b, h, nq, d = self.q_sub.shape
        if self.teacher_sub.shape != self.q_sub.shape:
            raise ValueError(
                f"capture teacher_sub {tuple(self.teacher_sub.shape)} must match "
                f"q_sub {tuple(self.q_sub.shape)}"
            )
        if self.k.shape != self.v.shape or (self.k.shape[0], self.k.shape[1], self.k.shape[3]) != (b, h, d):
            raise ValueError(
                f"capture k {tuple(self.k.shape)} and v {tuple(self.v.shape)} must be "
                f"[B={b}, H={h}, N, D={d}]"
            )
        n = self.k.shape[2]
        idx = self.query_index
        if idx.dtype != torch.int64 or idx.shape != (nq,):
            raise ValueError(f"capture query_index must be int64 [{nq}], got {idx.dtype} {tuple(idx.shape)}")
        if nq and not (0 <= int(idx.min()) and int(idx.max()) < n):
            raise ValueError(
                f"capture query_index must lie in [0, {n}), got [{int(idx.min())}, {int(idx.max())}]"
            )
        image_tokens = self.meta.latent_h * self.meta.latent_w
        if self.meta.text_len + image_tokens > n:
            raise ValueError(
                f"capture text_len {self.meta.text_len} + latent {self.meta.latent_h}x{self.meta.latent_w} "
                f"= {self.meta.text_len + image_tokens} tokens exceeds N = {n}"
            )

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def tokens(self) -> int:
        """N, the length of the full sequence the keys and values cover."""
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes of tensor payload (the shard file adds a few KB of Arrow metadata)."""
        return sum(getattr(self, n).nbytes for n in TENSOR_FIELDS) + self.query_index.nbytes

    def copy_to(self, device: torch.device | str) -> Capture:
        """An independent, writable copy on `device` (captures read from a shard alias read-only memory)."""
        return Capture(
            meta=self.meta,
            **{n: getattr(self, n).to(device, copy=True) for n in (*TENSOR_FIELDS, "query_index")},
        )
