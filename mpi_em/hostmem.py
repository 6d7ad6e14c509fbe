"""Host memory of CPU ranks: keep freed temporaries for the next ones.

An E-step batch on a CPU rank allocates and frees NumPy temporaries of 0.1-30 MB many times a second. glibc's
defaults give the larger ones back to the system when they are freed (mmap'ed blocks, and the heap trimmed above
twice the last such size), and the next batch faults the same pages in again, each zeroed by the kernel: a quarter
of a CPU job's time went to that. Kept instead, whole jobs on one CPU rank take 0.75-0.81x the wall time
(initial-model at box 32 and 64, refine3d at box 48; reconstruct 0.90x), the same maps bit for bit
(``benchmarks/host_memory_reuse.py``, ``benchmarks/results/host-memory-reuse/``).

:func:`keep_freed_memory` sets glibc's ``M_MMAP_THRESHOLD`` to its largest value (32 MiB: blocks up to it come from
the heap) and ``M_TRIM_THRESHOLD`` to 2 GiB (the heap is not trimmed below that), through ``mallopt``. Blocks over
32 MiB (volumes, accumulators) are still mapped and given back when freed, so a rank's resident memory stays near its
allocations' peak (measured: +4-9% peak RSS, the heap's slack). A user's own allocator settings
(``MALLOC_*`` or ``GLIBC_TUNABLES`` in the environment) are left as they are, as are glibc's defaults under
``MPI_EM_KEEP_FREED_MEMORY=0``; other C libraries are left alone.
"""
from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 32 * 2 ** 20   # glibc refuses more (HEAP_MAX_SIZE / 2 on 64-bit systems)
TRIM_THRESHOLD = 2 ** 31 - 1        # mallopt takes an int


def glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def keep_freed_memory() -> bool:
    """Set the two thresholds (see the module's text); True where both were set."""
    if os.environ.get("MPI_EM_KEEP_FREED_MEMORY", "1") == "0" or not glibc():
        return False
    if any(k.startswith("MALLOC_") or k == "GLIBC_TUNABLES" for k in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
