"""One layer's attention student: a local window softmax as the exact base, with a kernel regression
branch and a landmark softmax branch mixed in by bounded per-token gates, modulated by sigma and cfg.

    local    = softmax attention within a 2-D tile-aligned window   (core/attention/local.py)
    kernel   = normalised kernel regression over all keys          (core/attention/kernel.py)
    landmark = softmax over all text tokens + a 2-D landmark grid   (core/attention/landmarks.py)
    kernel, landmark <- sigma/cfg modulation, identity at init       (core/attention/conditioner.py)
    y = (1 - a_k - a_l) local + a_k kernel + a_l landmark            (core/attention/gate.py)

Why this combination: on Flux, pure linear attention collapses (CLEAR, arXiv 2412.16112: FID 325
against 8.9 for a local softmax window), while an exact local window alone gets close to the teacher.
So the local branch is the base that carries the output, and the two global branches, which see
what the window cannot, enter only through gates bounded by alpha_max <= 1/2 each, starting at 5 %
each; the output is always a convex combination of the three. The kernel branch is global and
full-rank in the values but smooth; the landmark branch is exact softmax but low-rank; each covers
a failure of the other, and each has its own gate, driven by its disagreement with the local base.
Text queries take the local branch only, which for them is exact softmax over every key.

The gates normalise each query's disagreement by a reference mean. Taking it over all image queries
would make a query's output depend on the other queries, and a distillation capture keeps only a
subsample of the queries (with every key and value). So the reference is the mean disagreement of
the branches at fixed probes, a 2-D grid of up to 64 image positions queried with their own keys:
it depends on k, v and the geometry only, which a capture holds in full. The forward of a query
subset (`query_index`) is therefore the full forward restricted to those rows, and the students
trained on captures are the students that serve.

Fail closed: `forward` reports which branches hold a non-finite value; a route then serves the
teacher instead (core/attention/routes.py). Exceptions are not caught: they are bugs, not fallbacks.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any, NamedTuple

import torch
from torch import nn

from core.attention.conditioner import Conditioner, modulate
from core.attention.config import STUDENT_FORMAT, ForwardLimits, StudentConfig
from core.attention.gate import adaptive_alpha, disagreement, mix_branches, normalised_disagreement
from core.attention.geometry import TokenGeometry, index_to
from core.attention.kernel import (
    KEY_CHUNK,
    QUERY_CHUNK,
    FeatureMap,
    KernelState,
    kernel_readout,
    kernel_state,
)
from core.attention.kernels.dispatch import fused_applies
from core.attention.landmarks import QUERY_CHUNK as LANDMARK_QUERY_CHUNK
from core.attention.landmarks import landmark_attention, landmark_count, landmark_grid, landmark_indices
from core.attention.local import local_attention, local_attention_at

GATE_PROBES = 64  # image positions whose keys probe the branches for the gates' reference disagreement
GAMMA_INIT = 2.0  # slope of the gate in the disagreement (the TTR student's fixed gamma); learned here
BRANCHES = ("local", "kernel", "landmark", "output")


class Branches(NamedTuple):
    """The three branch outputs [B, H, N, d] fp32, and the kernel's smallest denominator (0-d)."""

    local: torch.Tensor
    kernel: torch.Tensor
    landmark: torch.Tensor
    min_denominator: torch.Tensor


class StudentOutput(NamedTuple):
    out: torch.Tensor  # [B, H, N, d], dtype of q
    nonfinite: tuple[str, ...]  # names in BRANCHES holding a NaN or Inf; () when the output may serve
    min_denominator: float  # smallest phi_q(q).z of the kernel branch, before its eps floor


class Student(nn.Module):
    """Attention student for q, k, v [B, H, N, d] of one layer (config.heads x config.head_dim)."""

    def __init__(self, config: StudentConfig) -> None:
        super().__init__()
        self.config = config
        h, d, f = config.heads, config.head_dim, config.features
        self.phi_q = FeatureMap(d, f, config.feature_depth)
        self.phi_k = FeatureMap(d, f, config.feature_depth)
        logit = math.log(config.alpha_init / (1.0 - config.alpha_init))
        self.logit_kernel = nn.Parameter(torch.full((h,), logit))
        self.logit_landmark = nn.Parameter(torch.full((h,), logit))
        self.gamma_kernel = nn.Parameter(torch.full((h,), GAMMA_INIT))
        self.gamma_landmark = nn.Parameter(torch.full((h,), GAMMA_INIT))
        self.conditioner = Conditioner()

    def branches(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        geometry: TokenGeometry,
        query_index: torch.Tensor | None = None,
        state: KernelState | None = None,
        limits: ForwardLimits | None = None,
    ) -> Branches:
        """The three branch outputs for fp32 queries q [B, H, Nq, d] at sequence positions `query_index`
        ([Nq] int64; None: every position, Nq = N) over the full k, v [B, H, N, d], before modulation
        and mixing. `state`: the kernel branch's key summary, if already computed for these k, v.
        `limits`: this call's chunk sizes and landmark cap (ForwardLimits; None: the defaults)."""
        cfg, lim = self.config, limits or ForwardLimits()
        if query_index is None:
            local = local_attention(q, k, v, geometry, tile=cfg.local_tile, radius=cfg.local_radius)
        else:
            local = local_attention_at(
                q, k, v, geometry, query_index, tile=cfg.local_tile, radius=cfg.local_radius
            )
        if state is None:
            state = kernel_state(k, v, self.phi_k, key_chunk=lim.key_chunk or KEY_CHUNK)
        kernel = kernel_readout(q, state, self.phi_q, query_chunk=lim.query_chunk or QUERY_CHUNK)
        most = cfg.landmark_max if lim.landmark_cap is None else min(cfg.landmark_max, lim.landmark_cap)
        m = landmark_count(
            geometry.n_img, fraction=cfg.landmark_fraction, minimum=cfg.landmark_min, maximum=most
        )
        landmark = landmark_attention(
            q, k, v, landmark_indices(geometry, m), query_chunk=lim.query_chunk or LANDMARK_QUERY_CHUNK
        )
        return Branches(local, kernel.out, landmark, kernel.min_denominator)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        geometry: TokenGeometry,
        sigma: torch.Tensor,
        cfg: torch.Tensor,
        *,
        query_index: torch.Tensor | None = None,
        limits: ForwardLimits | None = None,
    ) -> StudentOutput:
        """q [B, H, Nq, d], k, v [B, H, N, d] (post-RoPE, text first), sigma and cfg [B] -> StudentOutput.

        query_index: [Nq] int64 sequence positions of the rows of q (a distillation capture's query
        subsample); None means every position. The output's row i equals row query_index[i] of the
        full forward (to fp32 rounding): no part of a query's output depends on the other queries.
        limits: this call's chunk sizes and landmark cap (a trainer's OOM ladder); the config is left
        as it is. A call with limits takes this reference path, not the fused kernels.
        """
        self._check_shapes(q, k, v, geometry, query_index)
        whole = query_index is None and limits is None
        if whole and fused_applies(self.config, q, k, v):  # GPU kernels, tested against this
            from core.attention.kernels.fused_student import fused_forward  # imports Triton

            return fused_forward(self, q, k, v, geometry, sigma, cfg)
        qf, kf, vf = q.float(), k.float(), v.float()
        state = kernel_state(kf, vf, self.phi_k, key_chunk=(limits or ForwardLimits()).key_chunk or KEY_CHUNK)
        br = self.branches(qf, kf, vf, geometry, query_index, state, limits)
        probes = gate_probes(geometry)  # CPU positions: their window plan is built without a readback
        pb = self.branches(kf[:, :, index_to(probes, k.device)], kf, vf, geometry, probes, state, limits)
        mod = self.conditioner(sigma.reshape(-1), cfg.reshape(-1))
        kernel = modulate(br.kernel, mod.scale_kernel, mod.shift_kernel)
        landmark = modulate(br.landmark, mod.scale_landmark, mod.shift_landmark)
        ref_k = disagreement(pb.local, modulate(pb.kernel, mod.scale_kernel, mod.shift_kernel))
        ref_l = disagreement(pb.local, modulate(pb.landmark, mod.scale_landmark, mod.shift_landmark))
        ref_k, ref_l = ref_k.mean(dim=-1, keepdim=True), ref_l.mean(dim=-1, keepdim=True)  # [B, H, 1]
        positions = torch.arange(geometry.n) if query_index is None else query_index
        image = index_to(positions >= geometry.n_text, q.device)  # [Nq]: text queries take the local branch
        alpha_k = self._alpha(br.local, kernel, self.logit_kernel, self.gamma_kernel, mod.logit_kernel, ref_k)
        alpha_l = self._alpha(
            br.local, landmark, self.logit_landmark, self.gamma_landmark, mod.logit_landmark, ref_l
        )
        zero = alpha_k.new_zeros(())
        out = mix_branches(
            br.local,
            kernel,
            landmark,
            torch.where(image[:, None], alpha_k, zero),
            torch.where(image[:, None], alpha_l, zero),
        )
        # Every element of every branch enters the output through a product with a finite weight (0 x NaN
        # and 0 x Inf are NaN), so a finite output and finite gate references mean finite branches: one
        # pass, one host sync, and the branches are inspected only to say which failed.
        finite, min_den = torch.stack(
            [
                (
                    torch.isfinite(out).all() & torch.isfinite(ref_k).all() & torch.isfinite(ref_l).all()
                ).float(),
                br.min_denominator.float(),
            ]
        ).tolist()
        nonfinite: tuple[str, ...] = ()
        if not finite:
            parts = zip(BRANCHES[:3], (br.local, kernel, landmark), pb[:3], strict=True)
            nonfinite = tuple(
                name for name, x, p in parts if not (torch.isfinite(x).all() and torch.isfinite(p).all())
            ) + ("output",)
        return StudentOutput(out.to(q.dtype), nonfinite, min_den)

    def _check_shapes(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        geometry: TokenGeometry,
        query_index: torch.Tensor | None,
    ) -> None:
        h, n, d = self.config.heads, geometry.n, self.config.head_dim
        nq = n if query_index is None else query_index.shape[0]
        if tuple(k.shape[1:]) != (h, n, d) or v.shape != k.shape or tuple(q.shape) != (k.shape[0], h, nq, d):
            raise ValueError(
                f"student expects k, v [B, heads, n, head_dim] = [B, {h}, {n}, {d}] and q "
                f"[B, {h}, {nq}, {d}], "
                f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
            )
        if query_index is not None:
            if query_index.dtype != torch.int64 or query_index.ndim != 1:
                raise ValueError(
                    "student query_index must be int64 [Nq], got "
                    f"{query_index.dtype} {tuple(query_index.shape)}"
                )
            if nq and not (0 <= int(query_index.min()) and int(query_index.max()) < n):
                raise ValueError(
                    f"student query_index must lie in [0, {n}), got "
                    f"[{int(query_index.min())}, {int(query_index.max())}]"
                )

    def _alpha(
        self,
        base: torch.Tensor,
        other: torch.Tensor,
        logit: torch.Tensor,
        gamma: torch.Tensor,
        offset: torch.Tensor,
        reference: torch.Tensor,
    ) -> torch.Tensor:
        """Gate [B, H, Nq, 1] of every query, its disagreement normalised by the probes' mean `reference`."""
        dbar = normalised_disagreement(base, other, reference)  # [B, H, Nq]
        alpha = adaptive_alpha(
            logit[None, :, None] + offset[:, None, None],
            gamma[None, :, None],
            dbar,
            alpha_max=self.config.alpha_max,
        )
        return alpha.unsqueeze(-1)

    def get_extra_state(self) -> dict[str, Any]:
        """Stored in state_dict() under `_extra_state`: the format version and the config."""
        return {"format": STUDENT_FORMAT, "config": asdict(self.config)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("format") != STUDENT_FORMAT:
            raise ValueError(
                f"student state has format {state.get('format')!r}, this code reads {STUDENT_FORMAT}"
            )
        if StudentConfig(**state["config"]) != self.config:
            raise ValueError(f"student state is for {state['config']}, this student is {asdict(self.config)}")

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Student:
        """Rebuild a student from its own state_dict() (config and format read from `_extra_state`)."""
        extra = state.get("_extra_state")
        if not isinstance(extra, dict) or "config" not in extra:
            raise ValueError("student state has no _extra_state with a config: not a Student.state_dict()")
        student = cls(StudentConfig(**extra["config"]))
        student.load_state_dict(state)
        return student


def gate_probes(geometry: TokenGeometry) -> torch.Tensor:
    """Sequence positions [P] of the gates' probes: a 2-D stride grid of at most GATE_PROBES image tokens."""
    r, c = landmark_grid(geometry.rows, geometry.cols, GATE_PROBES)
    return geometry.n_text + (r[:, None] * geometry.cols + c[None, :]).reshape(-1)


def build_student(config: StudentConfig, *, seed: int) -> Student:
    """A freshly initialised student, its weights drawn from a generator seeded by `seed` alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Student(config)
