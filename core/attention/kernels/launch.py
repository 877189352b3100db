"""Launch settings of the student's Triton kernels, and the torch -> Triton dtype map.

The defaults were chosen by timing variants on an H200 at Flux.1's attention shape
(bench/attention_bench.py --sweep; bench/results/attention_bench_call1.json and attention_bench.json).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Launch(NamedTuple):
    """block: tokens per program step; warps: num_warps; stages: num_stages (software pipelining);
    chunk: columns of phi's second hidden layer produced at a time (feature-map kernels only);
    tiles: query tiles per program (window kernel only)."""

    block: int
    warps: int
    stages: int
    chunk: int = 64
    tiles: int = 1

    def options(self, interpret: bool) -> dict[str, int]:
        """Keyword arguments of a kernel launch (none under the CPU interpreter, which ignores them)."""
        return {} if interpret else {"num_warps": self.warps, "num_stages": self.stages}


# The fastest variants of the sweeps at 4096 px (66,048 tokens), H200, Triton 3.6 (the window and mix
# figures from the second sweep, after the landmark branch moved into the window kernel):
KV = Launch(block=64, warps=4, stages=1)  # the KV/z accumulation with phi_k: 3.12 ms (8 warps: 5.15)
READOUT = Launch(block=128, warps=8, stages=2)  # the readout with phi_q: 2.53 ms (64 x 8 warps: 4.54)
WINDOW = Launch(block=64, warps=4, stages=3)  # block: keys per text/landmark step: 4.69 ms (2 tiles: 4.83)
MIX = Launch(block=32, warps=4, stages=1)  # queries per program: 0.71 ms with bf16 branches


def tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[dtype]
