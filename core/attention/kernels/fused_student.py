"""The student's forward on the GPU kernels: same result as `Student.forward` (core/attention/student.py).

    local, landmark : triton_window for the image queries (one kernel: they share the text keys),
                      SDPA for the text queries
    kernel          : triton_feature_map (phi fused into the KV/z accumulation and the readout)
    mix             : triton_mix (modulation, adaptive gates, convex mix, non-finite flag), in q's dtype

The branch outputs are stored in q's dtype for bf16/fp16 inputs, in fp32 otherwise.

When the student's parameters need gradients (a trainer's update), the branches still come from the
kernels (the local and landmark branches have no parameters; the kernel branch has its own backward,
core/attention/kernels/kernel_branch.py) and the mix runs as the PyTorch code of the student, so
autograd reaches the gates and the conditioner.
"""

from __future__ import annotations

import torch

from core.attention.conditioner import modulate
from core.attention.gate import disagreement, mix_branches
from core.attention.geometry import TokenGeometry, index_to
from core.attention.kernel import KernelState
from core.attention.kernels.branches import mix, window_branches
from core.attention.kernels.kernel_branch import accumulate_state, feature_weights, kernel_branch
from core.attention.landmarks import landmark_count, landmark_indices
from core.attention.student import BRANCHES, Branches, Student, StudentOutput, gate_probes


def dot_dtype(q: torch.Tensor, interpret: bool) -> torch.dtype:
    """Operands of the kernels' matrix products: fp16 for fp16 inputs, else bf16 (fp32 when interpreting
    on a CPU, whose Triton interpreter computes bf16 products wrongly)."""
    if interpret:
        return torch.float32
    return torch.float16 if q.dtype == torch.float16 else torch.bfloat16


def branch_dtype(q: torch.Tensor) -> torch.dtype:
    """Storage of the branch outputs between the kernels: q's dtype for half types (the output's
    precision, and half the bytes the mix reads), else fp32."""
    return q.dtype if q.dtype in (torch.bfloat16, torch.float16) else torch.float32


def fused_branches(
    student: Student,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    geometry: TokenGeometry,
    *,
    interpret: bool,
    state: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Branches:
    """The three branch outputs [B, H, N, d] in branch_dtype(q); state: the kernel branch's (KV, z)."""
    cfg = student.config
    dot, out_dtype = dot_dtype(q, interpret), branch_dtype(q)
    m = landmark_count(
        geometry.n_img, fraction=cfg.landmark_fraction, minimum=cfg.landmark_min, maximum=cfg.landmark_max
    )
    local, landmark = window_branches(
        q, k, v, geometry, landmark_indices(geometry, m), tile=cfg.local_tile, radius=cfg.local_radius,
        dot=dot, out_dtype=out_dtype, interpret=interpret,
    )  # fmt: skip
    kernel = kernel_branch(
        q, k, v, student.phi_q, student.phi_k, state=state, dot=dot, out_dtype=out_dtype, interpret=interpret
    )
    return Branches(local, kernel.out, landmark, kernel.min_denominator)


def fused_forward(
    student: Student,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    geometry: TokenGeometry,
    sigma: torch.Tensor,
    cfg: torch.Tensor,
    *,
    interpret: bool = False,
) -> StudentOutput:
    """`Student.forward` on the kernels: q, k, v [B, H, N, d], sigma and cfg [B] -> StudentOutput.

    The gates' reference disagreements come from the probes as in `Student.forward`: the branches
    of the keys at `gate_probes(geometry)` taken as queries (a few dozen rows, so the PyTorch branch
    code on the kernels' KV/z state), averaged per (batch, head)."""
    b, h = q.shape[:2]
    with torch.no_grad():
        state = accumulate_state(
            k, v, feature_weights(student.phi_k, dot_dtype(q, interpret)), interpret=interpret
        )
    br = fused_branches(student, q, k, v, geometry, interpret=interpret, state=state)
    probes = gate_probes(geometry)  # CPU positions: no readback, their tables are copied asynchronously
    with torch.no_grad():
        kv_state = KernelState(state[0].reshape(b, h, *state[0].shape[1:]), state[1].reshape(b, h, -1))
        pb = student.branches(k[:, :, index_to(probes, k.device)].float(), k, v, geometry, probes, kv_state)
    mod = student.conditioner(sigma.reshape(-1), cfg.reshape(-1))
    ref_k = disagreement(pb.local, modulate(pb.kernel, mod.scale_kernel, mod.shift_kernel)).mean(
        -1, keepdim=True
    )
    ref_l = disagreement(pb.local, modulate(pb.landmark, mod.scale_landmark, mod.shift_landmark)).mean(
        -1, keepdim=True
    )  # [B, H, 1]
    n_text = geometry.n_text
    trains = torch.is_grad_enabled() and any(p.requires_grad for p in student.parameters())
    if trains:
        local = br.local.float()
        kernel = modulate(br.kernel.float(), mod.scale_kernel, mod.shift_kernel)
        landmark = modulate(br.landmark.float(), mod.scale_landmark, mod.shift_landmark)
        image = (torch.arange(geometry.n, device=q.device) >= n_text)[:, None]  # text queries: local only
        zero = local.new_zeros(())
        alpha_k = student._alpha(
            local, kernel, student.logit_kernel, student.gamma_kernel, mod.logit_kernel, ref_k
        )
        alpha_l = student._alpha(
            local, landmark, student.logit_landmark, student.gamma_landmark, mod.logit_landmark, ref_l
        )
        out = mix_branches(
            local, kernel, landmark, torch.where(image, alpha_k, zero), torch.where(image, alpha_l, zero)
        ).to(q.dtype)
        bad = (~torch.isfinite(out)).any().int()
    else:
        modulation = torch.stack(list(mod), dim=-1).float().contiguous()  # [B, 6]
        gates = torch.stack(
            [student.logit_kernel, student.gamma_kernel, student.logit_landmark, student.gamma_landmark]
        ).float().contiguous()  # fmt: skip
        reference = torch.cat([ref_k, ref_l], dim=-1).reshape(b * h, 2).contiguous()
        out, bad = mix(
            br.local, br.kernel, br.landmark, modulation, gates, reference,
            n_text=n_text, alpha_max=student.config.alpha_max, dtype=q.dtype, interpret=interpret,
        )  # fmt: skip
    refs_bad = (~torch.isfinite(ref_k)).any() | (~torch.isfinite(ref_l)).any()
    flag, min_den = torch.stack(
        [(bad.bool() | refs_bad).float(), br.min_denominator.detach().float()]
    ).tolist()
    nonfinite: tuple[str, ...] = ()
    if flag:
        kernel = modulate(br.kernel.float(), mod.scale_kernel, mod.shift_kernel)
        landmark = modulate(br.landmark.float(), mod.scale_landmark, mod.shift_landmark)
        parts = zip(BRANCHES[:3], (br.local, kernel, landmark), pb[:3], strict=True)
        nonfinite = tuple(
            name for name, x, p in parts if not (torch.isfinite(x).all() and torch.isfinite(p).all())
        ) + ("output",)
    return StudentOutput(out, nonfinite, min_den)
