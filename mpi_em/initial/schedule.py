"""initial-model's schedules and random draws, each a pure function of the options, the seed and the iteration
(so that every rank, and a run resumed with ``--continue``, draws the same)."""
from __future__ import annotations

import numpy as np


def ramp_fraction(it: int, n_iter: int) -> float:
    """0 at iteration 1, 1 from three quarters of the iterations on (the annealing ramp)."""
    ramp = max(1, int(round(0.75 * n_iter)) - 1)
    return min(1.0, (it - 1) / ramp)


def schedule(it: int, n_iter: int, ini_high: float, final_high: float) -> float:
    """Resolution limit (Å) of iteration ``it`` (1..n_iter): linear in Å from ``ini_high`` to ``final_high``
    over the first three quarters of the iterations, then ``final_high``."""
    return ini_high + ramp_fraction(it, n_iter) * (final_high - ini_high)


def noise_fudge(it: int, n_iter: int, fudge0: float) -> float:
    """The factor on the noise spectrum (a temperature: flatter posteriors early): ``fudge0`` at iteration 1,
    geometric down to 1 at the end of the ramp (RELION's SGD: --sgd_sigma2fudge_ini)."""
    return float(fudge0) ** (1.0 - ramp_fraction(it, n_iter))


def sums_decay(it: int, n_iter: int, d0: float, d1: float) -> float:
    """The running sums' decay at iteration ``it``: linear from ``d0`` to ``d1`` over the ramp. The model is
    reconstructed from S_it = decay x S_(it-1) + (the mini-batch's sums), so it holds about
    batch / (1 - decay) particles' worth of data and forgets the poses of early iterations."""
    return d0 + ramp_fraction(it, n_iter) * (d1 - d0)


def batch_size(it: int, n_iter: int, b0: int | None, b1: int) -> int:
    """Particles in iteration ``it``'s mini-batch: ``b1`` throughout when ``b0`` is None (a fixed mini-batch);
    else ``b0`` at iteration 1, rising linearly with the resolution over the annealing ramp (rounded to an
    integer) to ``b1`` at its end, then ``b1`` (RELION's SGD: --sgd_ini_subset to --sgd_fin_subset over its
    in-between iterations)."""
    if b0 is None:
        return int(b1)
    return int(np.floor(b0 + ramp_fraction(it, n_iter) * (b1 - b0) + 0.5))


def minibatch_rows(n: int, size: int, seed: int, it: int) -> np.ndarray:
    """The rows (sorted) of iteration ``it``'s mini-batch: the same on every rank, for any number of ranks."""
    size = min(int(size), n)
    return np.sort(np.random.default_rng([int(seed), 7, int(it)]).choice(n, size=size, replace=False))


def random_rotations(n: int, seed: int) -> np.ndarray:
    """(n, 3, 3) uniformly random rotations (unit quaternions from Gaussian 4-vectors), seeded."""
    q = np.random.default_rng([int(seed), 11]).standard_normal((n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
                     np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
                     np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1)], 1)
