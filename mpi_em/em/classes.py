"""Classification's class bookkeeping: the first iteration's random class subsets, per-class resolutions, the
re-seeding of collapsed classes and the centring of 2D class averages."""
from __future__ import annotations

import numpy as np

from .model import band_limited_noise, lowpass


def first_classes(n: int, K: int, seed: int) -> np.ndarray:
    """Random class subsets (1..K) for the first iteration: seeded, independent of the number of ranks; with few
    particles no class starts empty."""
    first = np.random.default_rng(seed).integers(1, K + 1, n)
    if np.bincount(first, minlength=K + 1)[1:].min() == 0:
        first[np.random.default_rng([seed, 1]).permutation(n)[:K]] = np.arange(1, K + 1)
    return first


def first_shell_2d(box: int) -> int:
    """class2d's first resolution shell (a new run, references from unaligned random subsets): RELION's, whose 2D
    classification without references low-passes its first references at 0.07 of the sampling frequency
    (``--ini_high`` by default then, ``MlOptimiser::initialiseGeneral``, "see S.H.W. Scheres (2010) Meth Enzym.")
    and takes that shell as the first iteration's resolution (``updateCurrentResolution`` at iteration 0): the
    first current size is it plus --incr-size (our first references are low-passed at that size)."""
    return max(1, int(np.floor(0.07 * box + 0.5)))  # RELION's ROUND


def data_vs_prior(info: dict) -> np.ndarray | None:
    """A classification M-step's data-vs-prior SSNR per reference and shell, RELION's: tau^2 x mean W (``info``'s
    "tau2" and "mean_w"); None where either is missing. The one product the schedule, the per-class resolutions
    and the model STAR's rlnSsnrMap read."""
    tau2, mw = info.get("tau2"), info.get("mean_w")
    if tau2 is None or mw is None:
        return None
    return np.atleast_2d(tau2) * np.atleast_2d(mw)


def data_vs_prior_shells(ssnr) -> np.ndarray:
    """Per row of ``ssnr`` (classes x shells, RELION's data-vs-prior tau^2 x mean W): the last shell of the run from
    shell 1 in which it stays >= 1, 0 where shell 1 is below 1; at most the box's N/2 - 1 (``ssnr`` holds N/2 + 1
    shells). RELION's rule (``MlOptimiser::updateCurrentResolution``: the first shell below 1, minus one): a shell
    past the first drop that rises above 1 again (noise, one class of many) does not count."""
    ssnr = np.atleast_2d(np.asarray(ssnr, dtype=np.float64))
    below = ssnr[:, 1:ssnr.shape[1] - 1] < 1.0   # shells 1 .. N/2 - 1
    return np.where(below.any(axis=1), below.argmax(axis=1), below.shape[1]).astype(np.int64)


def class_resolutions(info: dict, K: int, box: int, apix: float, gold: bool, resolution: list) -> np.ndarray:
    """Per class: Å of the last shell of the run from shell 1 where the data-vs-prior SSNR (tau^2 x mean W) is >= 1
    (classification, :func:`data_vs_prior_shells`; 999 where shell 1 is below 1), or the gold-standard resolution
    (refine3d; ``resolution``: one per iteration)."""
    if gold:
        return np.full(K, float(resolution[-1] if resolution else 0.0))
    ssnr = data_vs_prior(info)
    out = np.zeros(K)
    if ssnr is None:
        return out
    shells = data_vs_prior_shells(ssnr)[:K]
    out[:len(shells)] = np.where(shells > 0, box * apix / np.maximum(shells, 1), 999.0)
    return out


#: the re-seeding perturbation, x the standard deviation of the split class's map. It must stay small beside what
#: tells the particles' views apart, or the split copies fit every particle worse than the classes left alone:
#: at 0.1-0.2 a class2d of a compact particle (K = 20, SNR 1) collapsed into 1-8 classes and re-seeded them in
#: turn, grouping views no better than chance; at 0.02-0.05 it keeps 18-20 classes whose views are more coherent
#: than without re-seeding (tests/test_classification.py::test_class2d_keeps_its_classes_on_a_compact_particle;
#: benchmarks/results/class2d-reseed/)
RESEED_AMPLITUDE = 0.05


def reseed_classes(maps, class_prior, r_cur: float, below: float, seed: int, it: int, box: int, apix: float,
                   amplitude: float = RESEED_AMPLITUDE, xp=np):
    """Classes with a share under ``below`` / K take over half of the largest class, split symmetrically as in
    vector quantisation (Linde-Buzo-Gray): the largest class's reference m becomes m + e and the re-seeded one
    m - e, with e seeded Gaussian noise (seeded by seed, iteration and class: the same on every rank and for every
    number of ranks) low-passed to the current size ``r_cur``, at ``amplitude`` x the standard deviation of m as it
    is then; each gets half of the largest class's prior. 2D: white noise through :func:`lowpass`, all the
    re-seeded classes' in one call; 3D: the same distribution drawn on the band in Fourier space
    (:func:`band_limited_noise`: a whole volume's draws and two whole transforms took 0.45 s a class at box 256 on a
    2-core VM, 0.20 s with it; benchmarks/results/reseed/).
    ``maps``: host arrays (the job's state). ``xp``: where the transforms and the split are computed (a GPU rank's
    CuPy: the host kept the draws alone); the noise is drawn on the host either way, so CPU and GPU ranks split
    with the same numbers, equal to float rounding.
    Returns (maps, class prior, re-seeded classes): the prior a new array, the maps a new host array where a class
    was re-seeded (the input's maps are left as they are), else the input's."""
    prior = np.asarray(class_prior, dtype=np.float64).copy()
    K = len(prior)
    out = []
    low = np.flatnonzero(prior < below / K) if K >= 2 else []
    if len(low) == 0:
        return maps, prior, out
    maps = np.array(maps, copy=True)  # the state's maps may still be being written by the previous iteration's writer
    rngs = [np.random.default_rng([int(seed), int(it), int(k)]) for k in low]
    if maps.ndim == 3:  # (K, N, N) images, as many as the box has pixels included: (n, 1, N, N) is never a volume
        raw = gaussian_draws(rngs, maps.shape[1:], threads=1 if xp is np else RESEED_THREADS)[:, None]
        noises = lowpass(xp.asarray(raw), box, apix, box * apix / r_cur)[:, 0]
    else:
        noises = (band_limited_noise(g, box, 3, float(r_cur), xp=xp) for g in rngs)
    big, m_big = -1, None  # the largest class's map on xp (on the host: maps[big] itself), while it stays the largest
    for k, noise in zip(low, noises):
        if int(np.argmax(prior)) != big:
            _put(maps, big, m_big)
            big = int(np.argmax(prior))
            m_big = xp.asarray(maps[big])
        noise *= amplitude * float(m_big.std(dtype=xp.float64)) / max(float(noise.std(dtype=xp.float64)), 1e-30)
        # split symmetrically (m + e, m - e): neither copy is favoured, the data decide which members go where
        split = maps[k] if xp is np else xp.empty_like(m_big)
        xp.subtract(m_big, noise, out=split, casting="unsafe")
        xp.add(m_big, noise, out=m_big, casting="unsafe")
        _put(maps, int(k), split)
        prior[k] = prior[big] = 0.5 * prior[big]
        out.append(int(k))
    _put(maps, big, m_big)
    return maps, prior, out


def reseeded_direction_prior(direction_prior, class_prior, reseeded) -> np.ndarray:
    """The direction prior (K, D) after re-seeding: every class's row scaled to its new share ``class_prior``;
    the ``reseeded`` classes' rows (their old ones hold the little weight that made them re-seeded) the
    directions' distribution over all classes, at their new share."""
    dp = np.asarray(direction_prior, dtype=np.float64)
    share = np.asarray(class_prior, dtype=np.float64)
    rows = dp.sum(axis=1)
    out = dp * np.where(rows > 0, share / np.where(rows > 0, rows, 1.0), 0.0)[:, None]
    total = dp.sum(axis=0)
    shape = total / total.sum() if total.sum() > 0 else np.full(dp.shape[1], 1.0 / dp.shape[1])
    for k in reseeded:
        out[k] = share[k] * shape
    return out


#: host threads a GPU rank draws the re-seeding noise with (its host is otherwise idle then; CPU ranks draw in one
#: thread, the node's cores being the ranks')
RESEED_THREADS = 8


def gaussian_draws(rngs, shape, threads: int = 1) -> np.ndarray:
    """(len(rngs), *shape) float64: each generator's ``standard_normal(shape)``, the generators drawn in up to
    ``threads`` threads at once (NumPy fills without the interpreter lock; each generator's numbers are those of a
    serial draw, whatever the threads)."""
    out = np.empty((len(rngs),) + tuple(shape))
    threads = max(1, min(int(threads), len(rngs)))
    if threads == 1:
        for g, o in zip(rngs, out):
            g.standard_normal(out=o)
        return out
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads, thread_name_prefix="mpi_em-draws") as ex:
        list(ex.map(lambda i: rngs[i].standard_normal(out=out[i]), range(len(rngs))))
    return out


def _put(maps: np.ndarray, k: int, a) -> None:
    """``a`` (a device array) into the host maps' entry k; nothing where it is already there (a host view)."""
    from ..backend import is_gpu_array

    if a is not None and is_gpu_array(a):
        maps[k] = a.get()


def center_2d(maps):
    """Shift each class average so its centre of mass (positive density) is at the box centre (integer px)."""
    out = np.empty_like(maps)
    box = maps.shape[-1]
    c = np.arange(box) - box // 2
    for k, m in enumerate(maps):
        w = np.clip(m, 0, None)
        s = w.sum()
        if s <= 0:
            out[k] = m
            continue
        cy = int(np.rint((w.sum(axis=1) * c).sum() / s))
        cx = int(np.rint((w.sum(axis=0) * c).sum() / s))
        out[k] = np.roll(m, (-cy, -cx), axis=(0, 1))
    return out
