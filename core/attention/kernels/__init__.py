"""Fused GPU kernels (Triton) for the attention student, tested against core/attention's PyTorch code.

Nothing here imports Triton at import time: `dispatch.fused_applies` says whether the fused path can
run (a CUDA tensor, Triton importable, a supported config), and only then does the student import
the kernel modules. docs/attention.md, section 5, describes the kernels and their measured speed.
"""
