"""The student's GPU kernels (core/attention/kernels/) against the PyTorch reference of core/attention.

GPU tests (skipped without CUDA): each branch kernel, the fused forward and its parameter gradients
against the fp32 PyTorch code on the same bf16 inputs, at small shapes with partial tiles and at
Flux.1's attention shape (24 heads x 128, 512 text tokens, 32 x 32 image tokens). The error measure
is ||fused - ref|| / ||ref||; the kernels' products take bf16 operands (8 significant bits, a
relative rounding of 2^-9 per operand), so 2e-2 bounds them with room while a wrong index, mask or
formula gives errors of order 1.

CPU test: the same kernels under Triton's interpreter (fp32 products), in a subprocess because
TRITON_INTERPRET must be set before Triton is imported; skipped where Triton is not installed.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from core.attention.config import StudentConfig
from core.attention.geometry import TokenGeometry
from core.attention.kernel import FeatureMap, kernel_attention_reference
from core.attention.landmarks import landmark_attention, landmark_count, landmark_indices
from core.attention.local import local_attention
from core.attention.student import build_student

REPO = Path(__file__).resolve().parents[1]
FLUX = TokenGeometry(512, 32, 32)
TOL = 2e-2
# The backward recomputes phi in fp32 but takes the forward's output and denominators from the bf16
# kernels: measured 0.032 for phi's first layer at these shapes (H200), against O(1) for a wrong formula.
GRAD_TOL = 6e-2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return float((a - b).norm() / b.norm())


def qkv(geometry: TokenGeometry, heads: int, dim: int, *, seed: int, batch: int = 1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(3, batch, geometry.n, heads, dim, device="cuda", generator=g).to(torch.bfloat16)
    return tuple(t.permute(0, 2, 1, 3) for t in x.unbind(0))  # the route's layout: views of [B, S, H, D]


def trained_like(config: StudentConfig, seed: int):
    """A student with a non-zero conditioner and spread gates, so modulation and gating are exercised."""
    student = build_student(config, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.conditioner.net[-1].parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
        student.logit_kernel.add_(torch.randn(config.heads, generator=g))
        student.gamma_landmark.add_(torch.randn(config.heads, generator=g))
    return student


CASES = [  # geometry, heads, head_dim, features, tile, radius
    (TokenGeometry(5, 10, 13), 3, 64, 64, 8, 1),
    (TokenGeometry(0, 9, 7), 2, 32, 64, 4, 2),
    (TokenGeometry(70, 16, 24), 2, 128, 128, 8, 1),
    (FLUX, 24, 128, 128, 8, 1),
]


@pytest.mark.gpu
@pytest.mark.parametrize("geometry,heads,dim,features,tile,radius", CASES)
def test_window_kernel_matches_local_and_landmark_references(geometry, heads, dim, features, tile, radius):
    from core.attention.kernels.branches import window_branches
    from core.attention.kernels.launch import Launch

    q, k, v = qkv(geometry, heads, dim, seed=1, batch=2)
    index = landmark_indices(geometry, landmark_count(geometry.n_img, fraction=0.08, minimum=16, maximum=512))
    for out_dtype, tiles in ((torch.float32, 1), (torch.bfloat16, 1), (torch.bfloat16, 2)):
        local, landmark = window_branches(
            q, k, v, geometry, index, tile=tile, radius=radius, dot=torch.bfloat16, out_dtype=out_dtype,
            launch=Launch(64, 8, 2, tiles=tiles),
        )  # fmt: skip
        assert local.dtype == landmark.dtype == out_dtype
        ref_local = local_attention(q.float(), k.float(), v.float(), geometry, tile=tile, radius=radius)
        assert rel(local, ref_local) < TOL
        assert rel(landmark, landmark_attention(q.float(), k.float(), v.float(), index)) < TOL


@pytest.mark.gpu
@pytest.mark.parametrize("geometry,heads,dim,features,tile,radius", CASES)
def test_kernel_branch_matches_reference_forward_and_gradients(geometry, heads, dim, features, tile, radius):
    from core.attention.kernels.kernel_branch import kernel_branch

    torch.manual_seed(2)
    phi_q, phi_k = FeatureMap(dim, features, 2).cuda(), FeatureMap(dim, features, 2).cuda()
    q, k, v = qkv(geometry, heads, dim, seed=2)
    out = kernel_branch(q, k, v, phi_q, phi_k)
    ref = kernel_attention_reference(q.float(), k.float(), v.float(), phi_q, phi_k)
    assert rel(out.out, ref) < TOL
    grad = torch.randn_like(ref)
    params = [*phi_q.parameters(), *phi_k.parameters()]
    fused_grads = torch.autograd.grad(out.out, params, grad)
    ref_grads = torch.autograd.grad(ref, params, grad)
    for name, a, b in zip(
        [n for n, _ in [*phi_q.named_parameters(), *phi_k.named_parameters()]],
        fused_grads,
        ref_grads,
        strict=True,
    ):
        assert rel(a, b) < GRAD_TOL, name


@pytest.mark.gpu
@pytest.mark.parametrize("geometry,heads,dim,features,tile,radius", CASES)
def test_fused_student_matches_pytorch_student(geometry, heads, dim, features, tile, radius):
    from core.attention.kernels.dispatch import fused_applies

    config = StudentConfig(heads=heads, head_dim=dim, features=features, local_tile=tile, local_radius=radius)
    student = trained_like(config, seed=4).cuda()
    reference = copy.deepcopy(student).cpu()
    q, k, v = qkv(geometry, heads, dim, seed=4, batch=2)
    sigma = torch.tensor([0.3, 0.9], device="cuda")
    cfg = torch.tensor([1.0, 3.5], device="cuda")
    assert fused_applies(config, q, k, v)
    with torch.no_grad():  # inference: the Triton mix
        served = student(q, k, v, geometry, sigma, cfg)
    out = student(q, k, v, geometry, sigma, cfg)  # with gradients to the parameters: the PyTorch mix
    ref = reference(q.cpu(), k.cpu(), v.cpu(), geometry, sigma.cpu(), cfg.cpu())
    assert served.out.dtype == torch.bfloat16 and served.nonfinite == ()
    assert rel(served.out.cpu(), ref.out) < TOL
    assert out.out.dtype == torch.bfloat16 and out.nonfinite == ()
    assert rel(out.out.cpu(), ref.out) < TOL
    assert out.min_denominator == pytest.approx(ref.min_denominator, rel=TOL)
    grad = torch.randn(out.out.shape, generator=torch.Generator().manual_seed(5))
    (out.out.float() * grad.cuda()).sum().backward()
    (ref.out.float() * grad).sum().backward()
    for (name, p), r in zip(student.named_parameters(), reference.parameters(), strict=True):
        assert p.grad is not None and r.grad is not None, name
        assert rel(p.grad.cpu(), r.grad) < GRAD_TOL, name


@pytest.mark.gpu
def test_fused_student_reports_nonfinite_branch():
    config = StudentConfig(heads=2, head_dim=64)
    student = build_student(config, seed=6).cuda()
    geometry = TokenGeometry(4, 16, 16)
    q, k, v = qkv(geometry, 2, 64, seed=6)
    v = v.clone()
    v[0, 1, 40] = float("nan")  # one image value: the kernel branch (every query) and that token's windows
    with torch.inference_mode():
        out = student(q, k, v, geometry, torch.ones(1, device="cuda"), torch.ones(1, device="cuda"))
    assert "kernel" in out.nonfinite and "local" in out.nonfinite and out.nonfinite[-1] == "output"


@pytest.mark.gpu
def test_served_forward_reads_back_from_the_device_once():
    """The served forward queues every kernel and waits for the device once (its non-finite flag and
    smallest denominator). Each index table copied from pageable memory (landmarks, gate probes and
    their windows, one per chunk) synchronised the stream: about 200 waits a call drained the launch
    queue, and the 64 probes' small kernels then ran one at a time (15 ms a layer at 66K tokens)."""
    import warnings

    config = StudentConfig(heads=24, head_dim=128)
    student = trained_like(config, seed=3).cuda()
    q, k, v = qkv(FLUX, 24, 128, seed=3)
    sigma, cfg = torch.full((1,), 0.5, device="cuda"), torch.ones(1, device="cuda")
    with torch.inference_mode():
        student(q, k, v, FLUX, sigma, cfg)  # compiles the kernels
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                student(q, k, v, FLUX, sigma, cfg)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, syncs


@pytest.mark.gpu
def test_dispatch_rules():
    from core.attention.kernels.dispatch import config_supported, fused_applies

    config = StudentConfig(heads=2, head_dim=64)
    q = torch.zeros(1, 2, 8, 64, device="cuda")
    assert fused_applies(config, q, q, q)
    assert not fused_applies(config, q.cpu(), q.cpu(), q.cpu())
    assert not fused_applies(config, q.requires_grad_(), q, q)
    assert not config_supported(StudentConfig(heads=2, head_dim=64, feature_depth=3))
    assert not config_supported(StudentConfig(heads=2, head_dim=64, local_tile=6))


INTERPRETED = """
import torch
from core.attention.config import StudentConfig
from core.attention.geometry import TokenGeometry
from core.attention.student import build_student
from core.attention.kernels.fused_student import fused_forward

torch.manual_seed(0)
geometry = TokenGeometry(5, 10, 13)  # partial tiles, text keys in a partial block
config = StudentConfig(heads=2, head_dim=16, features=64, landmark_min=8)
student = build_student(config, seed=1)
with torch.no_grad():
    for p in student.conditioner.net[-1].parameters():
        p.normal_(0.0, 0.3)
    student.logit_kernel.normal_()
q, k, v = torch.randn(3, 2, 2, geometry.n, 16).unbind(0)
sigma, cfg = torch.tensor([0.3, 0.9]), torch.tensor([1.0, 3.5])
grad = torch.randn(2, 2, geometry.n, 16)
with torch.no_grad():
    served = fused_forward(student, q, k, v, geometry, sigma, cfg, interpret=True)  # the Triton mix
fused = fused_forward(student, q, k, v, geometry, sigma, cfg, interpret=True)
(fused.out * grad).sum().backward()
fused_grads = [p.grad.clone() for p in student.parameters()]
student.zero_grad()
ref = student(q, k, v, geometry, sigma, cfg)
(ref.out * grad).sum().backward()
err = max((x.out - ref.out).norm() / ref.out.norm() for x in (served, fused))
grad_err = max(float((a - p.grad).norm() / p.grad.norm()) for a, p in zip(fused_grads, student.parameters()))
print(f"{float(err):.3e} {grad_err:.3e} {abs(fused.min_denominator / ref.min_denominator - 1):.3e}")
"""


@pytest.mark.cpu
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (interpreter)")
def test_kernels_under_triton_interpreter_match_reference():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(INTERPRETED)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    err, grad_err, den_err = (float(x) for x in proc.stdout.split()[-3:])
    assert err < 1e-5 and grad_err < 1e-4 and den_err < 1e-5  # fp32 products in the interpreter
