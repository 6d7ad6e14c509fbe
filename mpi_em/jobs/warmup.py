"""`mpi-em warmup`: compile the GPU kernels ahead of the data.

The first job on a machine (or after a CuPy or driver update) compiles every GPU kernel it uses on first use: about
50 s of a 69 s box-128 refine3d on one H200 (benchmarks/results/kernel-compile/). Nearly all of them are CuPy's
element-wise and reduction kernels, which depend on dtypes and array ranks but not on the box, and CuPy keeps them
on disk (``CUPY_CACHE_DIR``, default ``~/.cupy/kernel_cache``). This command runs each job once on a tiny simulated
data set in a temporary folder — refine3d through its global and local searches, class3d (with and without
--zero-mask), class2d, reconstruct —
and the per-particle reductions at every block size CuPy's CUB kernels take (:data:`REDUCTION_SEGMENTS`), so that
the cache holds what real jobs use and their first iteration is as fast as the later ones; last, a refine3d at box
256 on 200 particles (40 where the GPU has less than 28 GiB free; :data:`_LARGE_JOB`) for the kernels of arrays
past 2^31 bytes and of a full batch at that box. Use it
once per machine (or per shared home directory on a cluster), e.g. after installing.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time

from ..errors import MpiEmError

log = logging.getLogger("mpi_em")

DESCRIPTION = ("Compile the GPU kernels every job uses, ahead of the data: each job once on a tiny simulated data "
               "set in a temporary folder (refine3d with global and local searches, class3d, class2d, "
               "reconstruct). CuPy keeps the compiled kernels on disk (CUPY_CACHE_DIR, default "
               "~/.cupy/kernel_cache), so later jobs skip the compilation (about 50 s of a fresh box-128 refine3d "
               "on one H200). Once per machine or shared home directory. Nothing to do on CPU ranks.")

# the jobs, on a box-48 simulated set: refine3d reaches order 3 and a local search (from order 3) in 4 iterations
_JOBS = (
    ["refine3d", "--i", "{d}/particles.star", "--ref", "{d}/truth.mrc", "--ini-high", "20", "--iter", "4",
     "--max-order", "3", "--local-from-order", "3", "--o", "{t}/refine3d"],
    # the classifications re-seed (--reseed-below 0.99: a class under 0.99 / K after the first M-step), which a GPU
    # rank does on its device with kernels of its own (the split, the noise's transforms and standard deviations)
    ["class3d", "--i", "{d}/particles.star", "--ref", "{d}/truth.mrc", "--K", "2", "--iter", "2", "--reseed-below",
     "0.99", "--o", "{t}/class3d"],
    ["class2d", "--i", "{d}/particles.star", "--K", "3", "--iter", "2", "--reseed-below", "0.99", "--o",
     "{t}/class2d"],
    # class3d's default is --zero-mask (the job above); without it too
    ["class3d", "--i", "{d}/particles.star", "--ref", "{d}/truth.mrc", "--K", "2", "--iter", "1", "--no-zero-mask",
     "--o", "{t}/class3d_no_zero_mask"],
    ["reconstruct", "--i", "{d}/particles.star", "--o", "{t}/reconstruct"],
)


#: a refine3d at a large box on a handful of particles: CuPy specialises element-wise kernels for arrays whose byte
#: offsets pass 2^31 (64-bit indexing), which only the full-size iteration's accumulators of a box >= ~256 reach
#: (two half sets of (2N)^3 / 2 complex128 voxels: 2.1 GB at box 256). The first box-256 refine3d after a warmup
#: without it compiled 16 such kernels (copies, scatter and take of complex128, float64 element-wise;
#: benchmarks/results/relion-side-by-side/h200-box256-soft-mask-2026-12-03/).
_LARGE_JOB = ["refine3d", "--i", "{d}/particles.star", "--ref", "{d}/truth.mrc", "--ini-high", "30", "--iter", "2",
              "--o", "{t}/refine3d_large"]
#: free device memory the large-box job needs (its peak at box 256 with 40 particles, with margin)
LARGE_JOB_BYTES = 16 * 2 ** 30
#: particles of the large-box job where this much memory is free: a box-256 refine3d on 200 particles after a
#: warmup with 40 compiled 4 kernels (take, floor_divide, all and a bool copy, on strided arrays: shapes of a full
#: batch that 40 particles do not give; which step of the search makes them was not traced). The memory model puts
#: that job's peak at 24.8 GiB
LARGE_JOB_FULL = (28 * 2 ** 30, 200)


def add_arguments(p) -> None:
    p.add_argument("--n", type=int, default=400, help="particles of the simulated set (default 400)")
    p.add_argument("--large-box", type=int, default=256, metavar="N",
                   help="box of a last refine3d on 200 particles (40 where the GPU has less than 28 GiB free), "
                        "whose full-size iteration compiles the kernels of arrays past 2^31 bytes that large boxes "
                        "use (default 256; 0: leave it out; left out with a log line where the GPU has less than "
                        "16 GiB free)")
    p.add_argument("--keep", metavar="DIR", default=None,
                   help="work in DIR (created) and keep its outputs, instead of a temporary folder removed after")


def _gpu_available() -> bool:
    from ..backend import default_device

    return default_device() == "gpu"


#: CuPy's CUB reductions along an axis are compiled per block size, which follows the segment's length (32 to 512
#: threads for up to 128, 256, 512, 1024 and more elements): the E-step's per-particle reductions over its poses
#: (S x oversampling x translations, which the classes, the selection and the dimension set) meet all of them.
#: A class2d with K = 50 at box 256 compiled a float64 argmax of block 64 in its first iteration after a warmup
#: whose K = 3 did not (1.9 s of a 3.0 s iteration; benchmarks/results/relion-side-by-side/).
REDUCTION_SEGMENTS = (100, 200, 400, 800, 2000)


def compile_reductions(xp) -> int:
    """Run argmax, max and sum along the last axis of float32 and float64 arrays of every CUB block size, so
    that their kernels are in the cache. Returns the number of calls."""
    calls = 0
    for dtype in (xp.float32, xp.float64):
        for seg in REDUCTION_SEGMENTS:
            a = xp.zeros((3, seg), dtype=dtype)
            for op in (xp.argmax, xp.max, xp.sum):
                op(a, axis=1)
                calls += 1
    # all / any over a whole boolean array (CUB's two-pass device reduction; e.g. the fine pass's validity check),
    # at every block size too (a box-64 refine3d after a warmup of sizes 1000 and 2^20 only compiled an any() of
    # block 64)
    for n in REDUCTION_SEGMENTS + (1 << 20,):
        b = xp.zeros(n, dtype=bool)
        b.all()
        b.any()
        calls += 2
    xp.cuda.Stream.null.synchronize()
    return calls


def compile_reseeding(xp) -> int:
    """class2d's re-seeding of several classes at once (their noises low-passed in one call: the filter broadcast
    over a stack), which the warm-up's class2d may not reach (it re-seeds one class at a time; a K = 5 class2d at
    box 64 re-seeding two compiled a complex128 x float64 broadcast). Returns the number of calls."""
    import numpy as np

    from ..em.classes import reseed_classes

    maps = np.zeros((3, 48, 48), dtype=np.float32)
    maps[0, 20:28, 20:28] = 1.0
    for low in ([0.9, 0.05, 0.05], [0.6, 0.39, 0.01]):  # two classes re-seeded, then one
        reseed_classes(maps, low, 10.0, 0.99, 0, 1, 48, 2.0, xp=xp)
    xp.cuda.Stream.null.synchronize()
    return 2


def compile_large_arrays(xp) -> int:
    """Element-wise kernels on arrays whose byte span passes 2^31 (CuPy's 64-bit indexing variants) that the first
    box-256 refine3d after a warmup with :data:`_LARGE_JOB` still compiled: complex64 <-> complex128 copies and
    the conjugate of a whole complex128 array, the square of a float64 view and its product with a float32 view
    (``new_kernels_after_defaults.txt`` of the results named in :data:`_LARGE_JOB`'s comment). ~8 GB on the
    device for a moment. Returns the number of calls."""
    n = (1 << 27) + 1                       # complex128: 2^31 + 16 bytes; complex64 and float64: half of it
    a64 = xp.zeros(n, dtype=xp.complex64)
    a128 = a64.astype(xp.complex128)        # in 32-bit, out 64-bit
    del a64
    a64 = a128.astype(xp.complex64)         # in 64-bit, out 32-bit
    del a64
    xp.conj(a128)                           # 64-bit in and out
    del a128
    big = xp.zeros(2 * n, dtype=xp.float64)  # its strided view spans more than 2^31 bytes
    sq = xp.square(big[::2])                 # non-contiguous 64-bit in, contiguous 32-bit out
    xp.zeros(2 * n, dtype=xp.float32)[::2] * big[::2]
    del big, sq
    xp.cuda.Stream.null.synchronize()
    return 5


def run(args, comm) -> None:
    from ..cli import _setup_logging, main as cli_main

    if not _gpu_available():
        if comm.rank == 0:
            log.info("warmup: no GPU on this rank: nothing to compile (CPU ranks run NumPy)")
        return
    if args.n < 40:
        raise MpiEmError(f"--n must be at least 40, got {args.n}")
    if args.large_box < 0 or 0 < args.large_box < 48:
        raise MpiEmError(f"--large-box must be 0 or a box of at least 48, got {args.large_box}")
    top = os.path.abspath(args.keep) if args.keep else None
    if comm.rank == 0:
        if top:
            os.makedirs(top, exist_ok=True)
        else:
            top = tempfile.mkdtemp(prefix="mpi_em_warmup_")
    top = comm.bcast(top, root=0)
    data = os.path.join(top, "data")
    cache = os.environ.get("CUPY_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cupy", "kernel_cache"))
    t0 = time.perf_counter()
    steps = [["simulate", "--out", data, "--box", "48", "--n", str(args.n), "--snr", "0.3", "--seed", "3",
              "--device", "gpu"]] + [[a.format(d=data, t=top) for a in job] for job in _JOBS]
    large = False
    if args.large_box:
        import cupy

        free = comm.bcast(cupy.cuda.runtime.memGetInfo()[0] if comm.rank == 0 else None, root=0)  # one decision
        large = free >= LARGE_JOB_BYTES
        if large:
            big = os.path.join(top, "data_large")
            n_large = LARGE_JOB_FULL[1] if free >= LARGE_JOB_FULL[0] else 40
            steps += [["simulate", "--out", big, "--box", str(args.large_box), "--n", str(n_large), "--snr", "0.3",
                       "--seed", "3", "--device", "gpu"], [a.format(d=big, t=top) for a in _LARGE_JOB]]
        elif comm.rank == 0:
            log.info("warmup: %.1f GiB free on the GPU, the box-%d refine3d needs %d: left out (a large box's "
                     "first full-size iteration compiles its kernels)", free / 2 ** 30, args.large_box,
                     LARGE_JOB_BYTES >> 30)
    try:
        for step in steps:
            if comm.rank == 0:
                log.info("warmup: %s", step[0])
            code = cli_main(["--quiet"] + step)
            _setup_logging(comm.rank)
            if code:
                raise MpiEmError(f"warmup: the {step[0]} job failed (exit {code}); its error is above")
        if comm.rank == 0:
            import cupy

            log.info("warmup: reductions (%d block sizes)", len(REDUCTION_SEGMENTS))
            compile_reductions(cupy)
            compile_reseeding(cupy)
            if large:
                compile_large_arrays(cupy)
                cupy.get_default_memory_pool().free_all_blocks()
    finally:
        comm.Barrier()
        if comm.rank == 0 and not args.keep:
            shutil.rmtree(top, ignore_errors=True)
    if comm.rank == 0:
        log.info("warmup: GPU kernels compiled in %.1f s; cache %s", time.perf_counter() - t0, cache)
