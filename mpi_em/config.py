"""Every environment variable mpi_em reads, in one place (read when asked, so that a test may set one).

=============================  ==========================================================================
``MPI_EM_DEVICE``              ``cpu`` keeps every rank on the CPU, ``gpu`` asks for GPUs; default ``auto``
                               (one GPU per rank when CuPy sees one)
``MPI_EM_FUSED_KERNELS``       ``0``: GPU arrays use the array-expression projector / back-projector instead
                               of the fused CUDA kernels of :mod:`mpi_em.kernels` (default ``1``)
``MPI_EM_PINNED``              ``0``: GPU ranks read batches into pageable instead of page-locked memory
``MPI_EM_TIMING_DETAIL``       ``1``: the EM jobs also time the steps inside the phases (``run_timings.json``'s
                               ``detail_seconds``; more device synchronisations: for diagnosis, not timing)
``MPI_EM_GPU_ALLOCATOR``        ``async``: GPU arrays come from the CUDA driver's stream-ordered pool
                               (cudaMallocAsync), ``pool``: from CuPy's own memory pool; default ``auto``: the
                               driver's where the job has a memory limit (``--max-memory``), else CuPy's
``MPI_EM_STOP_AFTER_ITERATION``  ``N``: an EM job stops after iteration N as if killed there, its checkpoint
                               written (for tests of ``--continue`` that run the job in a subprocess)
=============================  ==========================================================================
"""
from __future__ import annotations

import os


def device() -> str:
    """``MPI_EM_DEVICE``: 'cpu', 'gpu' or 'auto'."""
    return os.environ.get("MPI_EM_DEVICE", "auto")


def fused_kernels() -> bool:
    return os.environ.get("MPI_EM_FUSED_KERNELS", "1") != "0"


def pinned() -> bool:
    return os.environ.get("MPI_EM_PINNED", "1") != "0"


def gpu_allocator() -> str:
    """``MPI_EM_GPU_ALLOCATOR``: 'pool' (CuPy's memory pool), 'async' (the driver's) or 'auto' (default: the
    driver's where the job has a memory limit, :func:`mpi_em.backend.allocator_choice`)."""
    v = os.environ.get("MPI_EM_GPU_ALLOCATOR", "auto")
    if v not in ("auto", "pool", "async"):
        from .errors import MpiEmError

        raise MpiEmError(f"MPI_EM_GPU_ALLOCATOR must be auto, pool or async, not {v!r}")
    return v


def timing_detail() -> bool:
    return os.environ.get("MPI_EM_TIMING_DETAIL") == "1"


def stop_after_iteration() -> int | None:
    """``MPI_EM_STOP_AFTER_ITERATION`` as an iteration number, or None."""
    value = os.environ.get("MPI_EM_STOP_AFTER_ITERATION")
    return int(value) if value else None
