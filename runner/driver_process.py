"""The driver process's settings for the per-step work it does between the GPUs' forwards.

The driver fuses every step's tiles, mixes the skip residual and takes the Euler step while the
GPUs wait at the step's barrier, so this work is on the critical path. Two settings keep it short:

Threads: those ops are memory-bound elementwise passes over 16 MB tensors; torch's default of one
thread per core makes them slower on large hosts. The driver's fusion and mixing of a 2048 ->
4096 px phase took 1.04 s on a 64-core host (12 steps) against 0.43-0.54 s on a 16-core host
(bench/results/scaling_4gpu.json, runner_overhead.json). `DRIVER_THREADS` caps them.

Memory: each step makes about a dozen full-latent temporaries (fusion canvas, weight sums,
skip-residual blend, re-noised reference, Euler update), 16 MB each for a 4096 px Flux latent.
glibc's defaults serve blocks that size with mmap and unmap them on free (or trim them off the heap
top), so each step faults the same pages in again: 4,698 minor faults a step in a synthetic step of
five such temporaries, 819 with the thresholds here (tests/test_driver_process.py); the driver's
share of a 2048 -> 4096 px phase with a free model fell from 0.325 s to 0.286 s (medians of 5 runs,
2-core CPU, `python bench/driver_step.py`). The cost is a driver whose resident memory stays at its
high-water mark (up to `TRIM_KEEP` of free heap is kept). mallopt is process-wide and idempotent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # glibc malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit (4 * 1024 * 1024 * sizeof(long))
TRIM_KEEP = 1 << 30
DRIVER_THREADS = 8


def limit_driver_threads() -> dict:
    """Cap torch's intra-op threads in this (the driver) process at DRIVER_THREADS; for job.json."""
    import torch

    before = torch.get_num_threads()
    if before > DRIVER_THREADS:
        torch.set_num_threads(DRIVER_THREADS)
    return {"torch_threads": torch.get_num_threads(), "default": before}


def keep_freed_memory() -> dict:
    """Raise glibc's mmap and trim thresholds for this process; returns what was done, for job.json.

    Blocks under 32 MiB then come from the heap, and up to 1 GiB of free heap stays mapped. Where
    the C library is not glibc (macOS, musl) nothing changes and the record says why.
    """
    if not sys.platform.startswith("linux"):
        return {"applied": False, "reason": f"not Linux ({sys.platform})"}
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError) as err:
        return {"applied": False, "reason": f"no glibc mallopt in {name}: {err}"}
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_KEEP) == 1
    if not done:
        return {"applied": False, "reason": f"mallopt refused the thresholds ({name})"}
    return {"applied": True, "mmap_threshold": MMAP_THRESHOLD_MAX, "trim_threshold": TRIM_KEEP}
