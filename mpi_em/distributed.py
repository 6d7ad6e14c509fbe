"""Distribution: the particle plan made on rank 0, GPU placement, collectives, and failure agreement.

- :func:`make_plan` (rank 0): half sets (kept from rlnRandomSubset, else assigned reproducibly from a seed)
  and balanced contiguous blocks of particles, sorted by (stack, slice) so that each rank reads whole runs
  of its stacks. Only indices and per-particle metadata travel (``comm.scatter``), never pixels.
- :func:`agree`: every rank reports whether its step failed; if any did, all ranks raise
  :class:`RankFailed` with the failing ranks' messages, so nobody waits forever in a later collective.
- :func:`allreduce_sum` / :func:`reduce_sum`: sums of (host or device) buffers through mpi4py.
"""
from __future__ import annotations

import logging
import os
import time

import numpy as np

from . import config
from .backend import gpu_available, is_gpu_array, to_host, xp_of
from .errors import MpiEmError, out_of_memory_line

log = logging.getLogger("mpi_em")

# per-particle metadata fields that travel in the plan
PLAN_FIELDS = ("stack", "index", "defocus_u", "defocus_v", "defocus_angle", "voltage", "cs", "amp_contrast",
               "phase_shift", "bfactor", "pixel_size", "rot", "tilt", "psi", "origin_x", "origin_y",
               "class_number", "optics_group", "ctf_scale")


class RankFailed(MpiEmError):
    """One or more ranks failed a step; carries their messages and the exit code to use."""

    def __init__(self, messages: list[str], exit_code: int = 1):
        self.messages = messages
        self.exit_code = exit_code
        super().__init__("; ".join(messages))

    def __reduce__(self):
        return (type(self), (self.messages, self.exit_code))


def world():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def _env_int(env, name: str) -> int:
    try:
        return int(env.get(name, ""))
    except ValueError:
        return 0


def launch_mismatch(size: int, env=None) -> str | None:
    """Why this process, alone in COMM_WORLD (``size`` 1), was started as one of several tasks, or None.

    A launcher that numbers its tasks (srun's job step: SLURM_STEP_ID with SLURM_STEP_NUM_TASKS; a PMI-1/2
    launcher such as MPICH's mpiexec or ``srun --mpi=pmi2``: PMI_SIZE; Open MPI's mpirun: OMPI_COMM_WORLD_SIZE)
    that the MPI library did not join would make each task a separate 1-rank job writing the same outputs.
    sbatch's own SLURM_NTASKS (the batch script, outside any step) is not such a launch."""
    env = os.environ if env is None else env
    if size != 1:
        return None
    pmi, ompi = _env_int(env, "PMI_SIZE"), _env_int(env, "OMPI_COMM_WORLD_SIZE")
    step = _env_int(env, "SLURM_STEP_NUM_TASKS") if "SLURM_STEP_ID" in env else 0
    if pmi > 1:
        n, by = pmi, "srun --mpi=pmi2" if step else "a PMI launcher (MPICH's mpiexec/mpirun)"
        fix = ("this MPI does not speak PMI-2: use `srun --mpi=pmix`" if step else
               "use the mpirun of the MPI that mpi4py was built with")
    elif ompi > 1:
        n, by = ompi, "Open MPI's mpirun"
        fix = "use the mpirun of the MPI that mpi4py was built with (the venv's for the `mpi` extra)"
    elif step > 1:
        n, by = step, "srun"
        fix = ("start it with `srun --mpi=pmi2` (MPICH, as the `mpi` extra installs) or `srun --mpi=pmix` "
               "(an MPI built with PMIx); `srun --mpi=list` shows what this Slurm has")
    else:
        return None
    return (f"this process is 1 of {n} tasks started by {by}, but MPI sees it alone (each task would run the "
            f"whole job by itself): {fix}")


def launcher_rank(env=None) -> int:
    """This task's number as its launcher gave it (0 when none did)."""
    env = os.environ if env is None else env
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID"):
        if name in env:
            return _env_int(env, name)
    return 0


def wait_for_all(comm) -> None:
    """Return when every rank has called it, without spinning a core meanwhile: MPI's blocking collectives
    busy-poll (a rank that waited 3 s for rank 0 used 2.3 s of CPU, MPICH, 2 ranks on 2 cores), which takes the
    core from the ranks and jobs that share it (several ranks per node or per GPU, a loaded machine). A
    non-blocking barrier, tested between sleeps growing from 20 us to 1 ms: a wait ends at most ~1 ms after the
    slowest rank arrives (a short one within twice its length) and costs ~2% of its length in CPU."""
    if comm.size == 1:
        return
    req = comm.Ibarrier()
    delay = 2e-5
    while not req.Test():
        time.sleep(delay)
        delay = min(2.0 * delay, 1e-3)


def agree(comm, error: BaseException | None) -> None:
    """Collective: raise RankFailed on every rank if ``error`` is set on any rank (the ranks first wait for each
    other with :func:`wait_for_all`)."""
    wait_for_all(comm)
    msg = None
    code = 0
    if error is not None:
        msg = str(error) if isinstance(error, MpiEmError) else (
            out_of_memory_line(error) or f"{type(error).__name__}: {error}")
        code = getattr(error, "exit_code", 1)
    flags = comm.allgather((msg, code))
    failed = [(r, m, c) for r, (m, c) in enumerate(flags) if m is not None]
    if failed:
        raise RankFailed([m if comm.size == 1 else f"rank {r}: {m}" for r, m, _ in failed],
                         exit_code=max(c for _, _, c in failed))


def bcast_large(comm, obj, root: int = 0):
    """``comm.bcast`` for objects whose pickle may pass 2 GiB (a box-768 job's two start maps are 3.6 GB): pickle
    protocol 5 with the arrays sent out of band (:mod:`mpi4py.util.pkl5`), whose counts MPI's int cannot hold."""
    from mpi4py.util import pkl5

    return pkl5.Intracomm(comm).bcast(obj, root=root)


def collective_step(comm, fn, *args, **kwargs):
    """Run ``fn`` on every rank (no collectives inside), then :func:`agree` on the outcome."""
    err, out = None, None
    try:
        out = fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - reported to every rank
        err = e
    agree(comm, err)
    return out


def root_step(comm, fn, *args, **kwargs):
    """Run ``fn`` on rank 0 only, broadcast its result (or its failure) to every rank."""
    err, out = None, None
    if comm.rank == 0:
        try:
            out = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            err = e
    agree(comm, err)
    return comm.bcast(out, root=0)


# ------------------------------------------------------------------------------------------ the plan
def assign_halves(n: int, existing, seed: int) -> np.ndarray:
    """Half set (1 or 2) per particle: kept where rlnRandomSubset is 1/2, else balanced random from seed."""
    existing = np.asarray(existing, dtype=np.int64) if existing is not None else np.zeros(n, np.int64)
    if np.all((existing == 1) | (existing == 2)):
        return existing.copy()
    rng = np.random.default_rng(seed)
    halves = np.empty(n, dtype=np.int64)
    halves[rng.permutation(n)] = np.arange(n) % 2 + 1
    return halves


def balanced_blocks(n: int, size: int) -> list[slice]:
    """``size`` contiguous blocks of 0..n-1 whose lengths differ by at most one."""
    bounds = np.linspace(0, n, size + 1).round().astype(np.int64)
    return [slice(int(bounds[r]), int(bounds[r + 1])) for r in range(size)]


def reference_group(halves, rows, folds: int):
    """The reference set a particle is aligned against in refine3d: (half - 1) x folds + row mod folds."""
    return (np.asarray(halves) - 1) * folds + np.asarray(rows) % folds


def set_blocks(groups_sorted, size: int) -> list[slice]:
    """Blocks of particles ordered by reference set (``groups_sorted``, non-decreasing), so that a rank makes and
    projects the references of few sets: where the ranks divide evenly among the sets present, each set's
    particles are split over its own ``size / sets`` ranks (one set per rank; two ranks and one fold: one half set
    each, as RELION's ranks work on one half each); where the sets divide evenly among the ranks, each rank takes
    ``sets / size`` whole sets; otherwise the balanced blocks (a contiguous range of at most ceil(sets / size) + 1
    sets per rank)."""
    groups_sorted = np.asarray(groups_sorted)
    n = groups_sorted.size
    _, starts, counts = np.unique(groups_sorted, return_index=True, return_counts=True)
    S = starts.size
    if size <= 1 or S == 0:
        return balanced_blocks(n, size)
    if size % S == 0 and np.all(counts >= size // S):
        out = []
        for start, count in zip(starts, counts):
            out += [slice(int(start) + b.start, int(start) + b.stop) for b in balanced_blocks(int(count), size // S)]
        return out
    if S % size == 0:
        per = S // size
        bounds = np.append(starts, n)
        return [slice(int(bounds[r * per]), int(bounds[(r + 1) * per])) for r in range(size)]
    return balanced_blocks(n, size)


def make_plan(star, size: int, seed: int = 0, halves=None, folds: int = 1, by_set: bool = False) -> list[dict]:
    """Per-rank dicts of row ids ('row') and the metadata fields of those rows, plus 'half'. With ``by_set``
    (refine3d: each half set, or with folds > 1 each leave-one-fold-out set, has its own references) the particles
    are ordered by reference set first and split by :func:`set_blocks`, so a rank holds few of the 2 x folds sets
    and makes and projects only those references."""
    n = star.n
    halves = assign_halves(n, star.random_subset, seed) if halves is None else np.asarray(halves)
    keys = (star.index, star.stack)  # group each stack's slices together
    by_set = by_set or folds > 1
    if by_set:
        group = reference_group(halves, np.arange(n), folds)
        keys = keys + (group,)
    order = np.lexsort(keys)
    blocks = set_blocks(group[order], size) if by_set else balanced_blocks(n, size)
    plans = []
    for blk in blocks:
        rows = order[blk]
        p = {"row": rows, "half": halves[rows]}
        for f in PLAN_FIELDS:
            p[f] = np.asarray(getattr(star, f))[rows]
        plans.append(p)
    return plans


# ----------------------------------------------------------------------------------- device placement
def node_local_rank(comm) -> tuple[int, int]:
    from mpi4py import MPI

    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank)
    out = (local.rank, local.size)
    local.Free()
    return out


def select_device(comm, want: str = "auto") -> str:
    """'cpu' or 'cuda:K' for this rank: one GPU per node-local rank, round robin if ranks > GPUs."""
    if want == "cpu" or (want == "auto" and (config.device() == "cpu" or not gpu_available())):
        return "cpu"
    if not gpu_available():
        raise MpiEmError(f"--device {want} asked for, but CuPy with a CUDA device is not available on this rank")
    import cupy

    n_gpu = cupy.cuda.runtime.getDeviceCount()
    local_rank, _ = node_local_rank(comm)
    dev = local_rank % n_gpu
    cupy.cuda.Device(dev).use()
    return f"cuda:{dev}"


def gpu_collective_support() -> dict:
    """What this rank could use for collectives on GPU buffers: CUDA-aware MPI and NCCL (via CuPy)."""
    out = {"cuda_aware_mpi": False, "nccl": None}
    try:
        from mpi4py import MPI

        q = getattr(MPI, "Query_cuda_support", None)
        out["cuda_aware_mpi"] = bool(q()) if callable(q) else False
    except Exception:  # noqa: BLE001 - a probe
        pass
    try:
        from cupy.cuda import nccl  # type: ignore

        out["nccl"] = int(nccl.get_version())
    except Exception:  # noqa: BLE001 - a probe
        pass
    return out


def log_placement(comm, device: str, log) -> list[str]:
    """Collective: rank 0 logs every rank's host and device, and the collective path in use."""
    import socket

    info = comm.gather((socket.gethostname(), device, gpu_collective_support() if device != "cpu" else None), root=0)
    if comm.rank != 0:
        return []
    lines = [f"rank {r}: {h} {d}" for r, (h, d, _) in enumerate(info)]
    log.info("placement: %s", "; ".join(lines))
    gpus = [s for _, d, s in info if d != "cpu"]
    if gpus:
        cuda_aware = all(s["cuda_aware_mpi"] for s in gpus)
        nccl = gpus[0]["nccl"]
        log.info("collectives: device buffers staged through host memory and reduced by MPI (CUDA-aware MPI: %s; "
                 "NCCL %s: not used, the host path is the only one implemented)", "yes" if cuda_aware else "no",
                 nccl if nccl else "not available")
    else:
        log.info("collectives: host buffers through MPI")
    return lines


# -------------------------------------------------------------------------------------- collectives
def allreduce_sum(comm, arr):
    """In-place sum over ranks of a host or device array (device buffers staged through the host)."""
    from mpi4py import MPI

    if comm.size == 1:
        return arr
    if is_gpu_array(arr):
        host = to_host(arr)
        comm.Allreduce(MPI.IN_PLACE, host, op=MPI.SUM)
        arr[...] = xp_of(arr).asarray(host)
    else:
        comm.Allreduce(MPI.IN_PLACE, arr, op=MPI.SUM)
    return arr


def reduce_sum(comm, arr, root: int = 0):
    """Sum over ranks into ``root`` (returned there; other ranks get None)."""
    from mpi4py import MPI

    if comm.size == 1:
        return arr
    host = np.ascontiguousarray(to_host(arr))
    out = np.empty_like(host) if comm.rank == root else None
    comm.Reduce(host, out, op=MPI.SUM, root=root)
    if comm.rank != root:
        return None
    return xp_of(arr).asarray(out) if is_gpu_array(arr) else out
