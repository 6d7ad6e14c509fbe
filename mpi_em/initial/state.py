"""initial-model's checkpoints for ``--continue``: after every mini-batch iteration, rank 0 writes the model, the
noise spectrum, the class priors, the search's scalars, every particle's pose and class and the running
accumulators (their summed values inside the ball the insertion reaches, as flat indices of the padded half-grid:
tiny next to the grid) into ``run_itNNN_checkpoint.h5`` and then ``checkpoint.json`` (mpi_em.io.checkpoint).

The mini-batches and the grids' perturbations are drawn from the seed and the iteration number, so a run resumed
from iteration k draws what the uninterrupted run draws: the same maps to float tolerance (the running sums are
resumed as their total on rank 0, where the uninterrupted run holds per-rank partial sums)."""
from __future__ import annotations

import json

import numpy as np

from ..backend import to_host, xp_of
from ..io.checkpoint import read_checkpoint, write_checkpoint

MODE = "initial-model"
SCALARS = ("iter", "offset_sigma", "perturb", "r_acc")
#: per-particle fields carried through the iterations
PER_PARTICLE = ("rot", "tilt", "psi", "origin_x", "origin_y", "class_number", "pmax", "loglike", "nsig")


def ball_indices(npad: int, radius: float) -> np.ndarray:
    """Flat indices of the padded half-grid (npad, npad, npad // 2 + 1; z and y wrapped) within ``radius``."""
    f = np.fft.fftfreq(npad) * npad
    x = np.arange(npad // 2 + 1, dtype=np.float64)
    r2 = f[:, None, None] ** 2 + f[None, :, None] ** 2 + x[None, None, :] ** 2
    return np.flatnonzero(r2.ravel() <= radius * radius)


def gather_ball(comm, acc, idx: np.ndarray):
    """(K, len(idx)) host array: the ranks' accumulators ``acc`` (K, npad, npad, nx) summed, at ``idx``, on rank 0
    (None on the others)."""
    from mpi4py import MPI

    xp_vals = acc.reshape(acc.shape[0], -1)[:, xp_of(acc).asarray(idx)]
    vals = np.ascontiguousarray(to_host(xp_vals))
    out = np.empty_like(vals) if comm.rank == 0 else None
    comm.Reduce(vals, out, op=MPI.SUM, root=0)
    return out


def scatter_ball(vals, idx: np.ndarray, shape, dtype, xp, rank: int):
    """The running sum's array of one rank on resume: rank 0 holds the saved total, the others zeros."""
    acc = xp.zeros(shape, dtype=dtype)
    if rank == 0 and vals is not None:
        flat = acc.reshape(shape[0], -1)
        flat[:, xp.asarray(idx)] = xp.asarray(vals)
    return acc


def save(out: str, it: int, scalars: dict, arrays: dict, particles: dict, args: dict, input_record) -> None:
    """Rank 0: iteration ``it``'s state, then the pointer (with the run's options and its input's record)."""
    a = {f"particles/{k}": np.asarray(v) for k, v in particles.items()}
    a.update({k: np.asarray(v) for k, v in arrays.items() if v is not None})
    write_checkpoint(out, it, MODE, a, {"state": json.dumps(scalars), "mode": MODE},
                     {"args": args, "input": input_record})


def load(folder: str):
    """(pointer, scalars, arrays, particles) of the last finished iteration in ``folder``."""
    ptr, arrays, attrs = read_checkpoint(folder, MODE)
    scal = json.loads(attrs["state"])
    particles = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("particles/")}
    arrays = {k: v for k, v in arrays.items() if not k.startswith("particles/")}
    return ptr, scal, arrays, particles

