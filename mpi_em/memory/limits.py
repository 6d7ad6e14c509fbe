"""The limit a job runs under and what happens when the model exceeds it: what would fit, the check before the
first allocation (with adaptation), the --max-memory option, the record in run.json (see :mod:`mpi_em.memory`)."""
from __future__ import annotations

import math
import os
import numpy as np

from dataclasses import replace

from ..errors import MpiEmError
from .model import (EMInputs, MemoryEstimate, ReconstructInputs, estimate, fmt)


# ------------------------------------------------------------------------------------------ what would fit
def suggestions(inp, limit: int, max_ranks: int = 4096) -> list[str]:
    """Each change of one option that brings the peak under ``limit`` (more ranks: the fewest that fit)."""
    out = []
    fits = lambda x: estimate(x).total <= limit  # noqa: E731
    if getattr(inp, "accumulate", None) == "double" and fits(replace(inp, accumulate="single")):
        out.append("--accumulate single")
    if isinstance(inp, ReconstructInputs) and not inp.stream and \
            _largest(lambda b: fits(replace(inp, stream=True, batch=b)), 1, inp.batch):
        out.append(f"--max-volume-memory {_size_arg(limit)} (owned planes only)")  # it picks the batch
    if isinstance(inp, EMInputs) and inp.dim == 3 and inp.ranks > 1 and not inp.owned_accumulators:
        b = _largest(lambda b: fits(replace(inp, owned_accumulators=True, batch=b)), 1, inp.batch)
        if b:
            out.append("--owned-accumulators on" + (f" --batch {b}" if b < inp.batch else "") +
                       " (owned kz planes only)")
    P = inp.ranks + 1
    while P <= max_ranks and not fits(replace(inp, ranks=P)):
        P = P + 1 if P < 16 else P * 2
    if P <= max_ranks:
        out.append(f"{P} ranks")
    if inp.batch > 1:
        b = _largest(lambda b: fits(replace(inp, batch=b)), 1, inp.batch - 1)
        if b:
            out.append(f"--batch {b}")
    if getattr(inp, "cache_images", False) and fits(replace(inp, cache_images=False)):
        out.append("--cache-images off")
    if getattr(inp, "folds", 1) > 1:
        f = _largest(lambda f: fits(replace(inp, folds=f)), 1, inp.folds - 1)
        if f:
            out.append(f"--folds {f}")
    if inp.pad > 1 and fits(replace(inp, pad=1)):
        out.append("--pad 1")
    return out


def _largest(ok, lo: int, hi: int) -> int | None:
    """The largest x in [lo, hi] with ok(x) (ok monotone: true up to some x), or None."""
    if not ok(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


def _size_arg(n: int) -> str:
    for unit, s in (("G", 2 ** 30), ("M", 2 ** 20), ("K", 2 ** 10)):
        if n >= s:
            return f"{n // s}{unit}"
    return str(n)


# ------------------------------------------------------------------------------------------ between phases
#: bytes of cuFFT plan work areas this process's job lets CuPy's plan cache keep between phases (0: the cache is
#: cleared between phases); set by :func:`keep_fft_plans` after the job's memory check
_plan_allowance = 0


def plan_allowance(est: MemoryEstimate, limit: int | None) -> int:
    """What the cuFFT plans of the other phases may keep between phases without the job passing ``limit``: the
    limit less the model's peak (which counts the peak phase's own plans), where that is at least the largest
    phase's plans (one of each phase's plans can then stay); else 0. No limit known: 0."""
    if limit is None:
        return 0
    room = int(limit) - int(est.total)
    largest = max((int(p.get("fft_plans", 0)) for p in est.phases.values()), default=0)
    return room if room > 0 and room >= largest else 0


def keep_fft_plans(xp, est: MemoryEstimate | None, limit: int | None) -> int:
    """GPU ranks, after the job's memory check: CuPy's cuFFT plan cache keeps its plans between phases within
    :func:`plan_allowance` bytes of work areas (least recently used evicted beyond it) instead of being cleared
    by every :func:`release_device_memory`: a cleared cache destroys and re-creates the plans of every phase
    (measured: 45 clears in a 9-iteration box-256 refine3d, 3.4 s of its 23.7 s). Where the model leaves no room
    (a job sized to its limit) the cache is cleared between phases, as the model assumes. Returns the
    allowance (0 on CPU ranks and without room)."""
    global _plan_allowance
    _plan_allowance = 0 if (xp is np or est is None) else plan_allowance(est, limit)
    if _plan_allowance > 0:
        xp.fft.config.get_plan_cache().set_memsize(_plan_allowance)
    return _plan_allowance


def release_device_memory(xp) -> None:
    """GPU ranks: give back what CuPy's memory pool holds unused and, unless the job keeps its cuFFT plans
    (:func:`keep_fft_plans`), the cached plans with their work areas (a padded 3D transform's is as large as its
    volume), so that a phase does not carry the last one's into its peak and ranks sharing a GPU get what one of
    them no longer uses. Nothing on CPU ranks."""
    if xp is np:
        return
    from ..backend import memory_pool

    if _plan_allowance <= 0:
        xp.fft.config.get_plan_cache().clear()
    memory_pool(xp).free_all_blocks()


# ------------------------------------------------------------------------------------------ the limit
def available_bytes(device: str, ranks_here: int = 1) -> int | None:
    """Memory this rank may use: GPU ranks, the device's free memory plus what CuPy's pool holds unused, shared
    by the ranks on the same device; CPU ranks, MemAvailable (/proc/meminfo) divided among the node's ranks.
    None where it cannot be read."""
    ranks_here = max(1, int(ranks_here))
    if device != "cpu":
        import cupy  # type: ignore

        from ..backend import memory_pool

        free, _ = cupy.cuda.runtime.memGetInfo()
        return int((free + memory_pool(cupy).free_bytes()) // ranks_here)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // ranks_here
    except OSError:
        pass
    return None


def parse_size(text, option: str = "--max-memory") -> int | None:
    """'512M', '2G', '1.5GiB', '1000000' -> bytes (binary units); None/'' -> None."""
    if text is None or str(text).strip() == "":
        return None
    t = str(text).strip().upper().replace("IB", "").rstrip("B")
    mult = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
    try:
        v = float(t[:-1]) * mult[t[-1]] if t and t[-1] in mult else float(t)
    except ValueError:
        v = -1
    if not v > 0 or not math.isfinite(v):
        from ..errors import InputError

        raise InputError(option, f"cannot read {text!r} as a size (e.g. 512M, 24G)")
    return int(v)


def add_argument(p) -> None:
    """``--max-memory`` of the four jobs."""
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="bytes each rank may use (e.g. 24G, 512M); default: the rank's share of its GPU's free "
                        "memory (CPU ranks: of the node's available memory). The job's memory model (logged and "
                        "in run.json) is checked against it before anything large is allocated: refine3d and class3d "
                        "first take owned accumulators (--owned-accumulators auto) and then the largest --batch "
                        "that fits, the EM jobs then single-precision accumulators (--accumulate auto); a job that still would not fit stops at once with one line saying what would "
                        "(more ranks, --owned-accumulators on, a smaller --batch, --cache-images off, fewer "
                        "--folds, --pad 1). The model is an upper bound (the largest "
                        "image size and pose grid the options allow): a larger SIZE than the device has runs "
                        "the job anyway, at the risk of running out later. GPU ranks of a job with this option "
                        "allocate from the CUDA driver's stream-ordered pool, whose reserve follows the arrays in "
                        "use, instead of CuPy's pool (MPI_EM_GPU_ALLOCATOR=pool|async overrides)")
    if p.prog.split()[-1] in ("refine3d", "class3d", "class2d"):
        p.add_argument("--accumulate", choices=("auto", "double", "single"), default="auto",
                       help="precision of the E-step's Fourier accumulators: 'double' (complex128 F, float64 W: 24 "
                            "bytes per voxel) or 'single' (complex64, float32: 12 bytes, as RELION's GPU ranks; "
                            "3D references in complex64 too, and the reconstruction's working copies, transposes "
                            "and inverse FFTs in single precision). The maps differ by float32 rounding (relative "
                            "~1e-6 at a few hundred insertions per voxel). 'auto' (default): double unless the "
                            "memory model says it does not fit and single does, after owned accumulators, a "
                            "smaller --batch and a global grid projected in chunks (the choice is logged and in "
                            "run.json)")
    if p.prog.split()[-1] in ("refine3d", "class3d"):
        p.add_argument("--owned-accumulators", choices=("auto", "on", "off"), default="auto",
                       help="'on': each rank accumulates only the Fourier kz planes it owns (1/P of the volumes; "
                            "every batch's insertion is sent to the planes' owners, and the M-step starts from "
                            "them without a reduce-scatter); 'off': full accumulators on every rank, reduce-"
                            "scattered after the E-step; 'auto' (default): owned planes where the memory model "
                            "says the full accumulators do not fit on more than one rank. The maps are the same "
                            "to float rounding (with a point group: to interpolation accuracy, each symmetry copy "
                            "being inserted instead of the sums symmetrised)")


class MemoryLimitError(MpiEmError):
    """The job would not fit: exit status 2, one line."""

    exit_code = 2


def check(comm, inp, max_memory=None, log=None, out_dir=None, adapt: str | None = None,
          precision: str | None = None, cache: str = "on", batch_floor: int | None = None, job: str | None = None,
          offers: tuple | None = None) -> MemoryEstimate:
    """Collective, before the job allocates: every rank evaluates the model for itself against its limit
    (``--max-memory`` if given, else :func:`available_bytes`); rank 0 logs the estimate and records it in
    ``out_dir``/run.json (key ``memory``); if any rank would not fit, every rank raises (through
    :func:`mpi_em.distributed.agree`) one line naming the rank, the figures and what would fit (exit 2).

    ``adapt`` (EM jobs: the ``--owned-accumulators`` choice, 'auto', 'on' or 'off'): where the options as
    given do not fit, the job is first lightened by design, the same way on every rank: owned accumulators
    (3D on more than one rank, with 'auto'), then no image cache (``cache``: the ``--cache-images`` option;
    only where it is 'auto'), then the largest E-step batch up to ``--batch`` that fits, then the
    global grid projected in chunks per batch (``grid_chunk``, with the batch as given); ``precision`` (the
    ``--accumulate`` choice) 'auto': where the double-precision accumulators still do not fit after these,
    single-precision ones (adapted the same way); reconstruct (no ``adapt``): ``precision`` chosen the same way
    (:func:`choose_precision`); ``precision`` None: the inputs' own; ``batch_floor`` (EM jobs whose batch is
    ``--batch``'s default, :func:`default_batch`): the batch lowered first, down to this, before anything else; the
    estimate returned (and logged) is the one the job runs with (``.inputs``). ``job``: the job's name in the message
    (default the model's mode); ``offers``: the options the job has, the only ones its message suggests (besides
    more ranks; default every option the model knows)."""
    from ..distributed import agree

    limit, source = _limit(comm, inp, max_memory)
    if adapt is not None and isinstance(inp, EMInputs):
        inp = _adapt_precision(comm, inp, limit, log, adapt, precision or inp.accumulate, cache, batch_floor)
    elif precision is not None:
        inp = choose_precision(comm, inp, limit, log, precision)
    est = estimate(inp)
    short = (est.total - limit) if limit is not None else -1
    every = comm.allgather(short)
    worst = int(np.argmax(every))
    err = None
    if every[worst] > 0 and comm.rank == worst:
        would = [w for w in est.suggestions(limit) if offers is None or not w.startswith("--")
                 or w.split()[0] in offers]
        err = MemoryLimitError(
            f"memory: {job or inp.mode} needs {fmt(est.total)} per rank ({_terms_text(est)}), {fmt(limit)} available "
            f"({source}): " + ("would fit with " + " or ".join(would) if would else
                               "neither more ranks, a smaller --batch, --cache-images off, fewer --folds, "
                               "--accumulate single nor --pad 1 alone would fit" if offers is None else
                               "neither more ranks nor " + " nor ".join(f"another {o}" for o in offers) +
                               " alone would fit"))
    if comm.rank == 0:
        allocator = gpu_allocator_of(inp)
        if log is not None:
            log.info("memory model: %s; limit %s (%s)%s", est.summary(), fmt(limit) if limit else "unknown", source,
                     {None: "", "pool": "; GPU arrays from CuPy's memory pool",
                      "async": "; GPU arrays from the CUDA driver's stream-ordered pool"}[allocator])
        if out_dir:
            record(out_dir, dict(est.as_dict(), limit_bytes=limit, limit_source=source, gpu_allocator=allocator))
    agree(comm, err)
    return est


def gpu_allocator_of(inp) -> str | None:
    """The GPU allocator this rank's job allocates from ('async' or 'pool', :func:`mpi_em.backend.allocator_choice`),
    None on CPU ranks (``inp.device``): run.json's ``memory.gpu_allocator``."""
    if inp.device == "cpu":
        return None
    from ..backend import allocator_in_use

    return allocator_in_use()


def choose_precision(comm, inp, limit, log, precision: str = "double", adapt=None):
    """The accumulators' precision (``--accumulate``, any job's inputs): 'double' or 'single' as given; 'auto':
    double where the double-precision job (lightened by ``adapt(inputs, log)`` first, if given) fits ``limit``
    on every rank, else single (also where neither fits: the lighter, whose error names what else would fit).
    Collective: every rank takes the same."""
    from mpi4py import MPI

    adapt = adapt or (lambda x, _log: x)
    if precision != "auto":
        return adapt(replace(inp, accumulate=precision), log)
    double = adapt(replace(inp, accumulate="double"), None)  # a trial, not logged
    if bool(comm.allreduce(limit is None or estimate(double).total <= limit, op=MPI.LAND)):
        return adapt(replace(inp, accumulate="double"), log)
    single = adapt(replace(inp, accumulate="single"), log)
    if comm.rank == 0 and log is not None:
        log.info("memory: double-precision accumulators do not fit (%s per rank): single precision (%s; "
                 "--accumulate)", fmt(estimate(double).total), fmt(estimate(single).total))
    return single


def _adapt_precision(comm, inp: EMInputs, limit, log, owned_option: str = "auto",
                     precision: str = "double", cache_option: str = "on",
                     batch_floor: int | None = None) -> EMInputs:
    """:func:`_adapt` in the accumulators' precision ``precision`` (:func:`choose_precision`)."""
    return choose_precision(comm, inp, limit, log, precision,
                            lambda x, lg: _adapt(comm, x, limit, lg, owned_option, cache_option, batch_floor))


#: the fewest orientations per chunk the adaptation prefers to a larger batch (one GEMM per chunk and batch)
MIN_GRID_CHUNK = 512

#: ``--batch``'s default: on GPU ranks the particles of 1024 box-128 images' pixels (a batch's kernels then
#: outlast their launches and host round trips: at 64 box-128 particles a batch cost ~17 ms of them on an H200,
#: 2.5-3 s per iteration of 10 000 particles whatever the search), between these bounds; on CPU ranks 64
GPU_BATCH_PIXELS = 1024 * 128 * 128
GPU_BATCH_RANGE = (64, 1024)
CPU_BATCH = 64


def default_batch(box: int, device: str) -> int:
    """``--batch``'s default for a job of images ``box`` px on ``device`` ('cpu' or a GPU): on GPU ranks
    :data:`GPU_BATCH_PIXELS` / box^2 particles within :data:`GPU_BATCH_RANGE` (1024 at box 128, 256 at 256, 64 from
    box 512), on CPU ranks :data:`CPU_BATCH`. The memory check lowers it where its workspace does not fit, before it
    lightens anything else (:func:`check`'s ``batch_floor``)."""
    if device == "cpu":
        return CPU_BATCH
    lo, hi = GPU_BATCH_RANGE
    return int(min(hi, max(lo, GPU_BATCH_PIXELS // (int(box) * int(box)))))


def _adapt(comm, inp: EMInputs, limit, log, owned_option: str = "auto", cache_option: str = "on",
           batch_floor: int | None = None) -> EMInputs:
    """Owned accumulators, then no image cache (``cache_option`` 'auto': the cache was the default's choice, not
    the user's), then a smaller batch, then (with the batch as given) the global grid projected in chunks, where
    the job as given does not fit ``limit`` on some rank. ``batch_floor`` (the batch was ``--batch``'s default,
    not the user's): first the largest batch down to it that fits, before anything else is lightened."""
    from mpi4py import MPI

    def fits(x):  # collective: on every rank
        return bool(comm.allreduce(limit is None or estimate(x).total <= limit, op=MPI.LAND))

    if fits(inp):
        return inp
    if batch_floor is not None and batch_floor < inp.batch:
        b = _largest(lambda b: fits(replace(inp, batch=b)), batch_floor, inp.batch - 1) or batch_floor
        default, inp = inp.batch, replace(inp, batch=b)
        enough = fits(inp)  # collective: on every rank, before rank 0 logs
        if comm.rank == 0 and log is not None:
            log.info("memory: E-step batch %d instead of the default %d%s", b, default,
                     "" if enough else " (not enough alone: lightened further below)")
        if enough:
            return inp
    batch0 = inp.batch
    auto_owned = owned_option == "auto"
    if auto_owned and inp.dim == 3 and inp.ranks > 1 and not inp.owned_accumulators:
        owned = replace(inp, owned_accumulators=True)
        lightest = replace(owned, batch=1, grid_chunk=1 if owned.coarse_poses > 1 else 0)
        if fits(owned) or fits(lightest):
            if comm.rank == 0 and log is not None:
                log.info("memory: the full accumulators (%s per rank) do not fit: each rank accumulates only its "
                         "kz planes (%s; --owned-accumulators)", fmt(estimate(inp).total), fmt(estimate(owned).total))
            inp = owned
    if cache_option == "auto" and not fits(inp) and inp.cache_images:  # fits() first: collective
        if comm.rank == 0 and log is not None:
            log.info("memory: the particle images are read from disk every iteration instead of kept in memory "
                     "(%s per rank; --cache-images)", fmt(estimate(inp).terms["cached_images"]))
        inp = replace(inp, cache_images=False)
    if inp.batch > 1 and not fits(inp):
        b = _largest(lambda b: fits(replace(inp, batch=b)), 1, inp.batch - 1)
        if b:
            if comm.rank == 0 and log is not None:
                log.info("memory: E-step batch %d instead of --batch %d (the largest whose workspace fits)", b,
                         inp.batch)
            inp = replace(inp, batch=b)
    if inp.coarse_poses > 1 and not fits(inp):  # the global grid's projections do not fit beside the rest:
        full = replace(inp, batch=batch0)        # project them in chunks per batch instead of keeping them
        c = _largest(lambda c: fits(replace(full, grid_chunk=c)), 1, inp.coarse_poses - 1)
        if not c and batch0 > 1:  # not with the batch as given: the largest batch with chunks of MIN_GRID_CHUNK
            lo = min(MIN_GRID_CHUNK, inp.coarse_poses - 1)  # orientations (or of 1), then the largest chunk
            b = next((b for b in (_largest(lambda b: fits(replace(full, batch=b, grid_chunk=c0)), 1, batch0 - 1)
                                  for c0 in (lo, 1)) if b), None)
            if b:
                full = replace(full, batch=b)
                c = _largest(lambda c: fits(replace(full, grid_chunk=c)), 1, inp.coarse_poses - 1)
        if c:
            if comm.rank == 0 and log is not None:
                log.info("memory: the global grid's projections (%d orientations per class) do not fit: projected "
                         "%d at a time for each batch of %d (%s per rank instead of %s)", inp.coarse_poses, c,
                         full.batch, fmt(estimate(replace(full, grid_chunk=c)).total),
                         fmt(estimate(replace(inp, batch=batch0)).total))
            inp = replace(full, grid_chunk=c)
    return inp


def job_limit(comm, inp, max_memory) -> int | None:
    """The bytes a rank of this job may use (what :func:`check` compares the model with), or None."""
    return _limit(comm, inp, max_memory)[0]


def adapt_iteration(comm, inp: EMInputs, limit, r: float, coarse_poses: int, translations: int,
                    batch_max: int) -> EMInputs:
    """One iteration's E-step batch and grid chunk (collective): :func:`check` chose them for the largest image
    size and pose grid the options allow; an iteration at a smaller size (``r``, px) or grid (``coarse_poses``
    orientations per class, 0 for local searches; ``translations``) may use a larger batch, up to ``batch_max``,
    and keep its grid's projections whole where they fit. The accumulators, their precision and the image cache
    stay as chosen. None where even this iteration's lightest choice would not fit (keep the job's)."""
    from mpi4py import MPI

    it = replace(inp, r=float(r), coarse_poses=int(coarse_poses), translations=int(translations),
                 batch=int(batch_max), grid_chunk=0)
    got = _adapt(comm, it, limit, None, owned_option="off", cache_option="on")
    ok = bool(comm.allreduce(limit is None or estimate(got).total <= limit, op=MPI.LAND))
    return got if ok else None


def _limit(comm, inp, max_memory):
    """(bytes this rank may use or None, where the figure comes from)."""
    from ..distributed import node_local_rank

    user = parse_size(max_memory)
    if user is not None:
        limit, source = user, "--max-memory"
    else:
        _, here = node_local_rank(comm)
        if inp.device != "cpu":
            import cupy  # type: ignore

            here = -(-here // max(1, cupy.cuda.runtime.getDeviceCount()))  # ranks sharing this rank's GPU
        limit, source = available_bytes(inp.device, here), ("free GPU memory" if inp.device != "cpu"
                                                            else "available memory")
    return limit, source


def _terms_text(est: MemoryEstimate) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {fmt(v)}" for k, v in est.terms.items() if v)


def record(out_dir: str, memory: dict) -> None:
    """Merge ``memory`` into ``out_dir``/run.json (written under a temporary name, then renamed)."""
    import json

    from ..io import atomic_path

    path = os.path.join(out_dir, "run.json")
    try:
        data = json.load(open(path)) if os.path.exists(path) else {}
    except (OSError, ValueError):
        data = {}
    data["memory"] = memory
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
