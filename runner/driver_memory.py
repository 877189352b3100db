"""Keep the driver's freed large blocks in its heap instead of handing them back to the kernel.

Every sampler step of a tiled job makes about a dozen full-latent temporaries in the driver (fusion
canvas, weight sums, skip-residual blend, re-noised reference, Euler update): 16 MB each for a
4096 px Flux latent. glibc's defaults serve blocks that size with mmap and unmap them on free (or
trim them off the heap top), so each step faults the same pages in again: 4,698 minor faults a step
in a synthetic step of five such temporaries, 819 with the settings here (tests/test_driver_memory.py),
and the driver's share of a 2048 -> 4096 px phase with a free model fell from 0.457 s to 0.392 s
(medians of 5 runs, 2-core CPU). That time is on the critical path: the GPUs wait at each step's
barrier while the driver fuses.

The cost is a driver whose resident memory stays at its high-water mark (up to `TRIM_KEEP` of free
heap is kept). mallopt is process-wide and idempotent; only the driver process calls this.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # glibc malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit (4 * 1024 * 1024 * sizeof(long))
TRIM_KEEP = 1 << 30


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
