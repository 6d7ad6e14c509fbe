"""The EM jobs' inputs, read and checked on rank 0 before the first iteration: particles, initial reference,
solvent mask, half sets, folds, the per-rank plans with the first iteration's class subsets; and the references'
mask."""
from __future__ import annotations

import logging

import numpy as np

from ..distributed import assign_halves, make_plan
from ..errors import InputError, MpiEmError
from ..io import check_stacks, check_writable_dir, read_map, read_particles
from ..io.sanity import check_box, check_half_sets, check_same_input, input_record, warn_absurd_values
from ..masks import soft_sphere
from ..symmetry import symmetry_matrices
from .classes import first_classes
from .model import lowpass
from .state import Mode

log = logging.getLogger("mpi_em")


def read_inputs(args, mode: Mode, size: int):
    """Rank 0: read and check everything, build the plans -> (plans, meta, initial reference, particles STAR).
    Resolves ``args.folds`` (refine3d) and clamps ``args.K`` to the number of particles."""
    check_writable_dir(args.output)
    star = read_particles(args.input)
    record = input_record(star)
    if getattr(args, "_expected_input", None):  # --continue: the run's own particles, or a one-line refusal
        check_same_input(record, args._expected_input, args.continue_dir)
    check_box(star)
    check_stacks(star)
    warn_absurd_values(star)
    box, apix = int(star.box[0]), float(star.pixel_size[0])
    K = 1 if mode.refine else int(args.K)
    if K < 1:
        raise MpiEmError(f"--K must be >= 1, got {K}")
    amplitude = getattr(args, "reseed_amplitude", None)
    if amplitude is not None and amplitude < 0:
        raise MpiEmError(f"--reseed-amplitude must be >= 0, got {amplitude}")
    if K > star.n:  # more classes than particles: some would stay empty (all-zero maps)
        log.warning("warning: K = %d classes is more than the %d particles of %s: using K = %d", K, star.n,
                    args.input, star.n)
        K = args.K = star.n
    if mode.gold:
        if getattr(args, "folds", None) is None:  # the default, shrunk for few particles (a quarter of them)
            args.folds = max(1, min(default_folds(box, args.pad), star.n // 4))
        elif args.folds < 1 or 4 * args.folds > star.n:
            raise MpiEmError(f"--folds must be between 1 and a quarter of the particles ({star.n} particles: at "
                             f"most {max(1, star.n // 4)}), got {args.folds}")
    folds = int(getattr(args, "folds", 1)) if mode.gold else 1
    ref = _read_reference(args, mode, box, apix) if mode.dim == 3 else None
    solvent = read_solvent_mask(args.solvent_mask, box, apix) if getattr(args, "solvent_mask", None) else None
    halves = None
    if mode.gold:
        halves = assign_halves(star.n, star.random_subset, args.seed)
        check_half_sets(star, halves)
    plans = make_plan(star, size, seed=args.seed, folds=folds, halves=halves, by_set=mode.gold)
    first_class = first_classes(star.n, K, args.seed)
    for p in plans:
        n = len(p["row"])
        if not mode.gold:
            p["half"] = np.ones(n, dtype=np.int64)
        p["class_number"] = first_class[p["row"]]
        if mode.dim == 2:
            p["rot"], p["tilt"] = np.zeros(n), np.zeros(n)
        p["pmax"], p["loglike"] = np.zeros(n), np.zeros(n)
        p["nsig"] = np.zeros(n, dtype=np.int64)
    meta = {"box": box, "pixel_size": apix, "n": star.n, "K": K, "folds": folds, "input": record,
            "solvent_mask": solvent}
    return plans, meta, ref, star


def _read_reference(args, mode: Mode, box: int, apix: float) -> np.ndarray:
    """--ref: the particles' box and pixel size, low-passed to --ini-high."""
    symmetry_matrices(args.sym)
    if not args.ref:
        raise MpiEmError(f"{mode.name} needs --ref (initial reference map)")
    ref, ref_apix = read_map(args.ref)
    if ref.shape != (box,) * 3:
        raise InputError(args.ref, f"map shape {ref.shape} does not match the particles' box {box}",
                         field="nx/ny/nz")
    if ref_apix <= 0:
        log.warning("warning: %s: field voxel_size: %g Å in the header; taking the particles' %.4f Å", args.ref,
                    ref_apix, apix)
    elif abs(ref_apix - apix) > 1e-3 * apix:
        raise InputError(args.ref, f"voxel size {ref_apix:.4f} Å differs from the particles' {apix:.4f} Å",
                         field="voxel_size")
    return lowpass(ref.astype(np.float32), box, apix, args.ini_high)


def default_folds(box: int, pad: int, budget: float = 4e9, most: int = 4) -> int:
    """--folds' default: the most folds (up to ``most``) whose 2 x F padded accumulators (complex128 F and
    float64 W, Np^2 (Np/2 + 1) voxels each) stay within ``budget`` bytes per rank; at least 1."""
    npad = pad * box
    volume = npad * npad * (npad // 2 + 1) * (16 + 8)
    return int(min(most, max(1, budget // (2 * volume))))


def reference_mask(box, apix, args, dim, xp, solvent=None):
    """The references' mask: the soft sphere of --particle-diameter, times the --solvent-mask where one is given."""
    radius = reference_radius(box, apix, args)
    m = soft_sphere(box, radius, width=min(4.0, box / 2 - radius), ndim=dim, xp=xp)
    return m if solvent is None else m * xp.asarray(solvent, dtype=m.dtype)


def reference_radius(box, apix, args) -> float:
    """The references' sphere radius, px: half --particle-diameter (default 80% of the box), 2 px inside it."""
    return min(image_mask_radius(box, apix, args), box / 2 - 2)


def image_mask_radius(box, apix, args) -> float:
    """Half --particle-diameter (default 80% of the box), px: the particle images' mask radius (--zero-mask), as
    RELION's particle_diameter / (2 pixel size)."""
    diam = args.particle_diameter if args.particle_diameter else 0.8 * box * apix
    return 0.5 * diam / apix


def read_solvent_mask(path, box, apix):
    """--solvent-mask: the particles' box and pixel size, values in [0, 1], not empty; else a one-line error."""
    mask, mask_apix = read_map(path)
    if mask.shape != (box,) * 3:
        raise InputError(path, f"map shape {mask.shape} does not match the particles' box {box}", field="nx/ny/nz")
    if mask_apix > 0 and abs(mask_apix - apix) > 1e-3 * apix:
        raise InputError(path, f"voxel size {mask_apix:.4f} Å differs from the particles' {apix:.4f} Å",
                         field="voxel_size")
    lo, hi = float(np.min(mask)), float(np.max(mask))
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1e-6 or hi > 1 + 1e-6:
        raise InputError(path, f"mask values must lie in [0, 1], found {lo:.4g} to {hi:.4g}", field="data")
    if hi <= 0:
        raise InputError(path, "the mask is empty (all zero)", field="data")
    return np.clip(mask, 0.0, 1.0).astype(np.float32)
