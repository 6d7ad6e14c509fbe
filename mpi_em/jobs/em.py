"""The EM jobs: `refine3d` (gold-standard 3D auto-refine), `class3d` and `class2d` — one driver, three modes.

Per iteration, on every rank: E-step over the rank's particles (batched, :mod:`mpi_em.em.engine`), then the
M-step: accumulators reduced (3D: stride-distributed volume) and references reconstructed with a tau^2 prior,
sigma^2 / class priors / offset prior updated from sums over ranks. Rank 0 writes the iteration's outputs and a
checkpoint (HDF5 + STAR, written under temporary names and renamed, then `checkpoint.json` points at it), so
`--continue DIR` resumes from the last finished iteration with the same result as an uninterrupted run.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time

import numpy as np

from ..backend import get_xp, synchronize, to_host
from ..distributed import (allreduce_sum, assign_halves, collective_step, log_placement, make_plan,
                           reference_group, root_step, select_device)
from ..em.engine import (SearchSpec, Stats, current_mats, end_e_step, image_shifts_px, expectation_batch,
                         inverse_sigma2_points, prepare_batch, shell_of_points, sigma2_from_images,
                         update_plan_poses)
from ..em.model import (batch_rounds, e_step_accumulators, lowpass, reduce_and_reconstruct_2d,
                        reduce_and_reconstruct_3d, routed_step)
from ..em.references import References, fine_offsets, global_grid, local_offsets
from ..errors import InputError, MpiEmError
from ..fourier import SliceGeometry, default_r_max, symmetrise
from ..fsc import fsc, resolution_at, shell_frequencies
from ..geometry import angular_distance, euler_to_matrix
from ..io import (BackgroundWriter, atomic_path, check_stacks, check_writable_dir, read_hdf5, read_map, read_particles,
                  write_hdf5, write_map, write_particles, write_stack, rebase_image_names)
from ..io.sanity import check_box, check_half_sets, check_same_input, input_record, warn_absurd_values
from ..masks import auto_solvent_mask, soft_sphere
from ..particles import ImageCache, cache_wanted, pinned_wanted
from ..sampling import angular_step, next_perturbation, next_translations
from ..symmetry import symmetry_matrices
from ..timing import PhaseTimer

log = logging.getLogger("mpi_em")

MODES = {
    "refine3d": {"dim": 3, "gold": True, "fudge": 1.0},
    "class3d": {"dim": 3, "gold": False, "fudge": 4.0},
    "class2d": {"dim": 2, "gold": False, "fudge": 2.0},
}
# checkpoints record the origin sign they were written with (older ones have none: the opposite sign)
ORIGIN_RULE = "relion"
PER_PARTICLE = ("rot", "tilt", "psi", "origin_x", "origin_y", "class_number", "pmax", "loglike", "nsig")


# -------------------------------------------------------------------------------------------- options
def add_arguments(p, mode: str) -> None:
    cfg = MODES[mode]
    p.add_argument("--i", dest="input", metavar="STAR", help="particles STAR file (RELION 3.1+)")
    p.add_argument("--o", dest="output", metavar="DIR", help="output folder (created)")
    p.add_argument("--continue", dest="continue_dir", metavar="DIR",
                   help="resume the job in DIR from its last finished iteration (other options are read from "
                        "its checkpoint; --iter may raise the iteration limit); refused when the particles STAR "
                        "file (by its absolute path) no longer holds the run's particles")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in the --o folder (its files are removed first); without it a "
                        "folder that holds another job's results is refused")
    if cfg["dim"] == 3:
        p.add_argument("--ref", metavar="MRC", help="initial reference map (box and pixel size of the particles)")
        p.add_argument("--ini-high", type=float, default=30.0,
                       help="low-pass the initial reference to this resolution, Å (default 30)")
        p.add_argument("--sym", default="C1", help="point-group symmetry C<n>, D<n>, T, O, I (default C1): the search covers the "
                       "asymmetric unit, the summed accumulators are symmetrised (RELION's symmetrise)")
        p.add_argument("--healpix-order", type=int, default=2,
                       help="initial HEALPix order of the global search (2 = 15°, 3 = 7.5°; default 2)")
        p.add_argument("--solvent-mask", metavar="MRC", default=None,
                       help="solvent mask, values in [0, 1] (mpi-em mask; box and pixel size of the particles): the "
                            "references are multiplied by it, besides the --particle-diameter sphere, before they "
                            "are projected (RELION's --solvent_mask); refine3d: the gold-standard FSC that sets "
                            "tau^2 and the resolution is then the masked one, corrected by phase randomisation "
                            "(RELION's --solvent_correct_fsc)")
        p.add_argument("--auto-mask", action="store_true",
                       help="without --solvent-mask: a solvent mask recomputed from the reference each iteration "
                            "and used as --solvent-mask is (references, masked and phase-randomisation-corrected "
                            "FSC): the average of the half maps (class3d: of the classes), low-passed to the "
                            "current resolution, thresholded at 0.1 x its maximum, extended and given a soft edge "
                            "of max(3 px, half the resolution) each (mpi-em mask), times the --particle-diameter "
                            "sphere. One mask for both half sets, from their average, as RELION and cryoSPARC do: "
                            "each half's noise enters it only through that average. Default off")
    if mode != "refine3d":
        p.add_argument("--K", type=int, default=4 if cfg["dim"] == 3 else 10, help="number of classes")
    if mode == "refine3d":
        p.add_argument("--max-order", type=int, default=4,
                       help="finest HEALPix order the auto-refinement may reach (default 4 = 3.75°)")
        p.add_argument("--local-from-order", type=int, default=4,
                       help="from this order on, search locally around the previous pose (default 4, as RELION)")
        p.add_argument("--folds", type=int, default=None, metavar="F",
                       help="split each half set into F folds (particle row modulo F) and align each fold's particles "
                            "against its half's reconstruction without that fold (leave one fold out): a particle "
                            "is then not compared with a reference that holds its own noise at its previous pose, "
                            "which pulls it there and narrows its posterior. Measured better maps on every data set "
                            "tried, most with few particles (README; benchmarks/results/refine3d-monotonic/). "
                            "Costs "
                            "2 x F padded Fourier accumulators per rank instead of 2 (box 128: 1.6 GB at F = 4; box "
                            "256: 13 GB), F x the coarse "
                            "search's reference projections, of the sets a rank holds (on a GPU no measurable time; "
                            "box 48 on 2 CPU ranks 1.5x the E-step, less with more ranks) and 1 + F "
                            "reconstructions per half; each iteration's checkpoint "
                            "holds the 2 x F references too (for an exact --continue). Default: 4 where the 2 x F "
                            "accumulators stay within 4 GB per rank, fewer where they would not (--pad 2: 4 below "
                            "box 174, 3 below 192, 2 below 220, 1 from box 220 on); 1 = RELION's scheme (each half's "
                            "particles against their whole half map)")
        p.add_argument("--refine-offsets", action=argparse.BooleanOptionalAction, default=True,
                       help="whenever the angular sampling is refined, refine the translations too (RELION's "
                            "auto-refine rule): fine step min(1.5, 0.75 x the translational accuracy) px, range 5 x "
                            "the last mean offset change, 9 to ~49 coarse translations (logged per iteration). "
                            "Measured: better maps (50 000 particles, box 128: 4.66 instead of 4.84 Å, shift error "
                            "0.29 instead of 0.46 px) for ~10%% more time on a GPU (CPU ranks: ~1.3x the order-3 "
                            "E-step, 49 instead of 9 coarse translations). Default on; --no-refine-offsets keeps "
                            "the --offset-step / --offset-range grid")
    if mode == "class3d":
        p.add_argument("--local", action="store_true",
                       help="local searches around the input poses instead of global searches")
    if cfg["dim"] == 2:
        p.add_argument("--psi-step", type=float, default=10.0, help="in-plane angular step, degrees (default 10)")
        p.add_argument("--no-center", action="store_true", help="do not re-centre the class averages")
    if mode != "refine3d":
        p.add_argument("--reseed-below", type=float, default=0.2, metavar="F",
                       help="re-seed a class whose share of the particles falls below F / K: its reference "
                            "becomes a seeded, perturbed copy of the largest class's, which it splits with "
                            "(default 0.2; 0 = never)")
    p.add_argument("--iter", type=int, default=None,
                   help="maximum number of iterations (default 25; refine3d: 20, and it stops earlier when "
                        "converged); with --continue, the new limit")
    p.add_argument("--particle-diameter", type=float, default=None,
                   help="diameter of the soft spherical mask, Å (default: 80%% of the box)")
    p.add_argument("--offset-range", type=float, default=3.0,
                   help="translation search range around each particle's current offset, pixels (default 3; refine3d: "
                        "the start, refined with the angular sampling unless --no-refine-offsets)")
    p.add_argument("--offset-step", type=float, default=1.0,
                   help="fine translation step, pixels (the coarse pass uses twice it; default 1; refine3d: the start, "
                        "refined with the angular sampling unless --no-refine-offsets)")
    p.add_argument("--perturb", type=float, default=0.5, metavar="F",
                   help="random perturbation of the angular and translational grids each iteration, as a fraction "
                        "of a step in [-F, F] (RELION's --perturb; default 0.5; 0 = fixed grids). With fixed grids "
                        "every particle is rounded onto the same poses each iteration and the references adapt "
                        "to the grid")
    p.add_argument("--tau2-fudge", type=float, default=cfg["fudge"],
                   help=f"regularisation T: weight of the data against the prior (default {cfg['fudge']:g})")
    p.add_argument("--n-select", type=int, default=4,
                   help="at most this many coarse poses per particle go to the oversampled fine pass: the best "
                        "ones until they hold 99.9%% of the coarse posterior (RELION's significant samples; "
                        "default 4)")
    if mode != "refine3d":
        p.add_argument("--class-select", type=int, default=10,
                       help="per particle, besides the --n-select best poses of its most probable class, the fine "
                            "pass refines the best pose of each of the next most probable classes up to this many "
                            "classes, so that class memberships stay soft (default 10)")
    p.add_argument("--batch", type=int, default=64, help="particles per E-step batch (default 64)")
    p.add_argument("--cache-images", choices=["auto", "on", "off"], default="auto",
                   help="keep each rank's particle images in its memory between iterations instead of reading them "
                        "again (auto: on GPU ranks whose images fit in a quarter of the free GPU memory; CPU ranks "
                        "read through the operating system's page cache)")
    p.add_argument("--pad", type=int, default=2, help="Fourier padding of the references (default 2)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"],
                   help="auto: one GPU per rank when CuPy sees one, else CPU")
    p.add_argument("--compress", action="store_true",
                   help="send volume buffers compressed (lossless) in the reduce-scatter")
    p.add_argument("--seed", type=int, default=0, help="seed for half sets and initial class subsets")
    p.add_argument("--no-ctf", action="store_true", help="ignore the CTF")
    p.add_argument("--ctf-intact-first-peak", action="store_true",
                   help="treat the CTF as 1 up to its first peak (RELION's --ctf_intact_first_peak: for data with "
                        "very low defocus or uncertain low-resolution CTF)")


# ---------------------------------------------------------------------------------------------- setup
def _init(args, mode, size):
    """Rank 0: read and check everything, build the plans and the initial state."""
    cfg = MODES[mode]
    check_writable_dir(args.output)
    star = read_particles(args.input)
    record = input_record(star)
    if getattr(args, "_expected_input", None):  # --continue: the run's own particles, or a one-line refusal
        check_same_input(record, args._expected_input, args.continue_dir)
    check_box(star)
    check_stacks(star)
    warn_absurd_values(star)
    box, apix = int(star.box[0]), float(star.pixel_size[0])
    K = 1 if mode == "refine3d" else int(args.K)
    if K < 1:
        raise MpiEmError(f"--K must be >= 1, got {K}")
    if K > star.n:  # more classes than particles: some would stay empty (all-zero maps)
        log.warning("warning: K = %d classes is more than the %d particles of %s: using K = %d", K, star.n,
                    args.input, star.n)
        K = args.K = star.n
    if cfg["gold"]:
        if getattr(args, "folds", None) is None:  # the default, shrunk for few particles (a quarter of them)
            args.folds = max(1, min(default_folds(box, args.pad), star.n // 4))
        elif args.folds < 1 or 4 * args.folds > star.n:
            raise MpiEmError(f"--folds must be between 1 and a quarter of the particles ({star.n} particles: at "
                             f"most {max(1, star.n // 4)}), got {args.folds}")
    folds = _folds(args, mode)
    if cfg["dim"] == 3:
        symmetry_matrices(args.sym)
        if not args.ref:
            raise MpiEmError(f"{mode} needs --ref (initial reference map)")
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
        ref = lowpass(ref.astype(np.float64), box, apix, args.ini_high).astype(np.float32)
    else:
        ref = None
    solvent = _read_solvent_mask(args.solvent_mask, box, apix) if getattr(args, "solvent_mask", None) else None
    rng = np.random.default_rng(args.seed)
    halves = None
    if cfg["gold"]:
        halves = assign_halves(star.n, star.random_subset, args.seed)
        check_half_sets(star, halves)
    plans = make_plan(star, size, seed=args.seed, folds=folds, halves=halves)
    if not cfg["gold"]:
        for p in plans:
            p["half"] = np.ones(len(p["row"]), dtype=np.int64)
    # random class subsets for the first iteration (seeded, independent of the number of ranks)
    first_class = rng.integers(1, K + 1, star.n)
    if np.bincount(first_class, minlength=K + 1)[1:].min() == 0:  # few particles: no class starts empty
        first_class[np.random.default_rng([args.seed, 1]).permutation(star.n)[:K]] = np.arange(1, K + 1)
    for p in plans:
        p["class_number"] = first_class[p["row"]]
        if cfg["dim"] == 2 or not getattr(args, "local", False):
            p["rot"] = np.zeros(len(p["row"])) if cfg["dim"] == 2 else p["rot"]
            p["tilt"] = np.zeros(len(p["row"])) if cfg["dim"] == 2 else p["tilt"]
        for f in ("pmax", "loglike"):
            p[f] = np.zeros(len(p["row"]))
        p["nsig"] = np.zeros(len(p["row"]), dtype=np.int64)
    meta = {"box": box, "pixel_size": apix, "n": star.n, "K": K, "folds": folds, "input": record,
            "solvent_mask": solvent}
    return plans, meta, ref, star


def _initial_state(args, mode, meta, ref):
    cfg = MODES[mode]
    box, apix, K = meta["box"], meta["pixel_size"], meta["K"]
    V = 2 if cfg["gold"] else K
    if cfg["dim"] == 3:
        maps = np.repeat(ref[None], V, axis=0)
        order = args.healpix_order
        r_cur = min(default_r_max(box), max(4, int(np.ceil(box * apix / args.ini_high)) + 2))
    else:
        maps = None  # made from random subsets in the first pass
        order = 0
        r_cur = min(default_r_max(box), max(4, box // 4))
    return {"iter": 0, "order": int(order), "local": bool(getattr(args, "local", False)), "r_cur": float(r_cur),
            "sigma2": None, "offset_sigma": float(args.offset_range / 2.0), "class_prior": np.full(K, 1.0 / K),
            "maps": maps, "resolution": [], "ang_change": [], "class_history": [], "best_res": 1e9, "no_improve": 0,
            "final": False, "done": False, "accuracy": 0.0, "accuracy_global": 0.0, "perturb": 0.0,
            "offset_step": float(args.offset_step), "offset_range": float(args.offset_range), "accuracy_trans": 0.0,
            "offset_change": 0.0, "references": None}


def default_folds(box: int, pad: int, budget: float = 4e9, most: int = 4) -> int:
    """--folds' default: the most folds (up to ``most``) whose 2 x F padded accumulators (complex128 F and
    float64 W, Np^2 (Np/2 + 1) voxels each) stay within ``budget`` bytes per rank; at least 1."""
    npad = pad * box
    volume = npad * npad * (npad // 2 + 1) * (16 + 8)
    return int(min(most, max(1, budget // (2 * volume))))


def _folds(args, mode):
    return int(getattr(args, "folds", 1)) if MODES[mode]["gold"] else 1


def _mask(box, apix, args, dim, xp, solvent=None):
    """The references' mask: the soft sphere of --particle-diameter, times the --solvent-mask where one is given."""
    radius = _mask_radius(box, apix, args)
    m = soft_sphere(box, radius, width=min(4.0, box / 2 - radius), ndim=dim, xp=xp)
    return m if solvent is None else m * xp.asarray(solvent, dtype=m.dtype)


def _mask_radius(box, apix, args):
    diam = args.particle_diameter if args.particle_diameter else 0.8 * box * apix
    return min(0.5 * diam / apix, box / 2 - 2)


def _read_solvent_mask(path, box, apix):
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


# ---------------------------------------------------------------------------------------- checkpoints
def _gather_particles(comm, plan):
    part = {k: plan[k] for k in ("row", "half") + PER_PARTICLE}
    parts = comm.gather(part, root=0)
    if comm.rank != 0:
        return None
    n = sum(len(p["row"]) for p in parts)
    out = {}
    for k in ("half",) + PER_PARTICLE:
        arr = np.empty(n, dtype=parts[0][k].dtype)
        for p in parts:
            arr[p["row"]] = p[k]
        out[k] = arr
    return out


def _star_updates(particles, mode):
    up = {"rlnAnglePsi": particles["psi"], "rlnOriginXAngst": particles["origin_x"],
          "rlnOriginYAngst": particles["origin_y"], "rlnClassNumber": particles["class_number"],
          "rlnMaxValueProbDistribution": particles["pmax"], "rlnLogLikeliContribution": particles["loglike"],
          "rlnNrOfSignificantSamples": particles["nsig"]}
    if MODES[mode]["dim"] == 3:
        up["rlnAngleRot"], up["rlnAngleTilt"] = particles["rot"], particles["tilt"]
    if MODES[mode]["gold"]:
        up["rlnRandomSubset"] = particles["half"]
    return up


def _snapshot(state):
    """The state as it is now, for the background writer: the loop replaces arrays (maps, sigma2, class_prior)
    with new ones every iteration but appends to these lists, so they are copied."""
    snap = dict(state)
    for k in ("resolution", "ang_change", "class_history"):
        snap[k] = list(state.get(k, []))
    return snap


def final_iteration(resolution, gold: bool, last: int) -> int:
    """The iteration (1-based) whose outputs become the final ones (run_*). refine3d: the one with the best
    gold-standard resolution, the latest of equals (``resolution``: one value per iteration): after its peak a
    map loses a little at unchanged sampling (benchmarks/results/issue4-monotonic/), and the iteration that finds
    the convergence is one that did not improve; the choice uses no ground truth, only the half sets' FSC.
    Classification (no gold standard): the last iteration."""
    if not gold:
        return last
    if len(resolution) != last:
        raise ValueError(f"{len(resolution)} gold-standard resolutions for {last} iterations")
    r = np.asarray(resolution, dtype=np.float64)
    return int(last - np.argmin(r[::-1]))


def _write_final(out, it, mode, state) -> None:
    """The final files (run_*): byte copies of the files of the iteration :func:`final_iteration` chooses."""
    import glob
    import shutil

    def files(k):  # iteration k's files by name (run_itNNN_<name>), its checkpoint excepted
        prefix = os.path.join(out, f"run_it{k:03d}_")
        return {f[len(prefix):]: f for f in glob.glob(glob.escape(prefix) + "*") if not f.endswith("_checkpoint.h5")}

    k = final_iteration(state["resolution"], MODES[mode]["gold"], it)
    sources = files(k)
    missing = sorted(set(files(it)) - set(sources)) if k != it else []
    if missing:  # removed by the user while the run went on, or written before a version that wrote them
        log.warning("iteration %d (the best gold-standard resolution) lacks %s in %s: the final files are those of "
                    "the last iteration, %d", k, ", ".join(missing), out, it)
        k = it
        sources = files(k)
    if not sources:
        raise InputError(os.path.join(out, f"run_it{k:03d}_*"), "the files from which the final ones are copied "
                         "are missing")
    for name, src in sorted(sources.items()):
        with atomic_path(os.path.join(out, "run_" + name)) as tmp:
            shutil.copyfile(src, tmp)
    if MODES[mode]["gold"]:
        log.info("final outputs (run_*): iteration %d, gold-standard resolution %.2f Å%s", k,
                 state["resolution"][k - 1], "" if k == it else
                 f" (the last iteration, {it}: {state['resolution'][-1]:.2f} Å)")


def _write_iteration(out, it, mode, star, particles, state, info, meta):
    """Rank 0: an iteration's maps, particles STAR, model STAR, checkpoint, pointer (each written atomically)."""
    import pandas as pd
    import starfile

    box, apix = meta["box"], meta["pixel_size"]
    tag = f"run_it{it:03d}"
    maps = state["maps"]
    cfg = MODES[mode]
    if cfg["dim"] == 2:
        write_stack(os.path.join(out, f"{tag}_classes.mrcs"), maps, apix)
    elif cfg["gold"]:
        write_map(os.path.join(out, f"{tag}_half1_class001_unfil.mrc"), maps[0], apix)
        write_map(os.path.join(out, f"{tag}_half2_class001_unfil.mrc"), maps[1], apix)
        if info.get("combined") is not None:  # both halves' sums, reconstructed with the gold-standard FSC
            write_map(os.path.join(out, f"{tag}_class001.mrc"), info["combined"], apix)
    else:
        for k in range(maps.shape[0]):
            write_map(os.path.join(out, f"{tag}_class{k + 1:03d}.mrc"), maps[k], apix)
    if info.get("auto_mask") is not None:  # --auto-mask: the mask this iteration used (a postprocess input)
        write_map(os.path.join(out, f"{tag}_mask.mrc"), info["auto_mask"], apix)
    write_particles(os.path.join(out, f"{tag}_data.star"), star, updates=_star_updates(particles, mode))
    n_sh = box // 2 + 1
    freqs = shell_frequencies(box, apix)
    general = pd.DataFrame({"rlnCurrentIteration": [it], "rlnCurrentResolution": [state["resolution"][-1]
                            if state["resolution"] else 0.0], "rlnPixelSize": [apix], "rlnNrClasses": [meta["K"]],
                            "rlnHealpixOrder": [state["order"]], "rlnCurrentImageSize": [int(2 * state["r_cur"])],
                            "rlnSigmaOffsetsAngst": [state["offset_sigma"] * apix],
                            "rlnLogLikelihood": [info.get("loglike", 0.0)]})
    classes = pd.DataFrame({"rlnReferenceImage": [f"{k + 1:06d}@{tag}_classes.mrcs" if cfg["dim"] == 2 else
                                                  f"{tag}_class{k + 1:03d}.mrc" for k in range(meta["K"])],
                            "rlnClassDistribution": state["class_prior"],
                            "rlnEstimatedResolution": _class_resolutions(info, meta["K"], box, apix, cfg["gold"],
                                                                         state)})
    blocks = {"model_general": general, "model_classes": classes}
    noise = pd.DataFrame({"rlnSpectralIndex": np.arange(n_sh), "rlnResolution": freqs,
                          "rlnSigma2Noise": state["sigma2"][:n_sh]})
    blocks["model_optics_group_1"] = noise
    tau2 = np.atleast_2d(info.get("tau2", np.zeros((1, n_sh))))
    for v in range(tau2.shape[0]):
        cols = {"rlnSpectralIndex": np.arange(n_sh), "rlnResolution": freqs, "rlnReferenceTau2": tau2[v][:n_sh]}
        if cfg["gold"] and "fsc" in info:
            cols["rlnGoldStandardFsc"] = info["fsc"][:n_sh]
        blocks[f"model_class_{v + 1}"] = pd.DataFrame(cols)
    with atomic_path(os.path.join(out, f"{tag}_model.star")) as tmp:
        starfile.write(blocks, tmp, float_format=None)
    if cfg["gold"] and "fsc" in info:
        from ..plots import fsc_png

        fsc_png(os.path.join(out, f"{tag}_fsc.png"), freqs, {"half1 vs half2": info["fsc"]},
                title=f"iteration {it}: {state['resolution'][-1]:.2f} Å at FSC 0.143")
    if not cfg["gold"] and state.get("class_history"):
        from ..plots import class_sizes_png

        class_sizes_png(os.path.join(out, "run_class_sizes.png"), np.asarray(state["class_history"]),
                        title=f"{mode}: class sizes, iteration {it}")
    if cfg["dim"] == 2:
        from ..plots import montage_png

        order = np.argsort(-state["class_prior"])
        montage_png(os.path.join(out, f"{tag}_classes.png"), maps[order],
                    labels=[f"{k + 1}: {100 * state['class_prior'][k]:.1f}%" for k in order])
    # checkpoint (everything needed to resume) then the pointer
    arrays = {f"particles/{k}": v for k, v in particles.items()}
    arrays["maps"] = maps
    if state.get("references") is not None:
        arrays["references"] = state["references"]
    arrays["sigma2"] = state["sigma2"]
    arrays["class_prior"] = state["class_prior"]
    arrays["resolution"] = np.asarray(state["resolution"], dtype=np.float64)
    arrays["ang_change"] = np.asarray(state["ang_change"], dtype=np.float64)
    arrays["class_history"] = np.asarray(state.get("class_history", []), dtype=np.float64).reshape(-1, meta["K"])
    scal = {k: state[k] for k in ("iter", "order", "local", "r_cur", "offset_sigma", "best_res", "no_improve",
                                  "final", "done", "accuracy", "accuracy_global", "perturb", "offset_step",
                                  "offset_range", "accuracy_trans", "offset_change")}
    scal["origin_rule"] = ORIGIN_RULE
    ck = f"run_it{it:03d}_checkpoint.h5"
    write_hdf5(os.path.join(out, ck), arrays, attrs={"state": json.dumps(scal), "mode": mode})
    with atomic_path(os.path.join(out, "checkpoint.json")) as tmp:
        with open(tmp, "w") as f:
            json.dump({"iteration": it, "checkpoint": ck, "mode": mode, "args": state["args"],
                       "input": meta.get("input")}, f, indent=1)


def _load_checkpoint(folder, mode):
    path = os.path.join(folder, "checkpoint.json")
    if not os.path.exists(path):
        raise InputError(path, "no checkpoint to continue from (no finished iteration in this folder)")
    with open(path) as f:
        ptr = json.load(f)
    if ptr.get("mode") != mode:
        raise InputError(path, f"checkpoint is of a {ptr.get('mode')} run, not {mode}", field="mode")
    arrays, attrs = read_hdf5(os.path.join(folder, ptr["checkpoint"]))
    state = json.loads(attrs["state"])
    state.update({"maps": arrays["maps"], "references": arrays.get("references"),
                  "sigma2": arrays["sigma2"], "class_prior": arrays["class_prior"],
                  "resolution": list(arrays["resolution"]), "ang_change": list(arrays["ang_change"]),
                  "class_history": np.asarray(arrays.get("class_history", np.zeros((0, 1)))).tolist()})
    particles = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("particles/")}
    if state.pop("origin_rule", None) != ORIGIN_RULE:
        # written before origins followed RELION's sign (the image is its projection moved by -origin): those
        # runs stored the image's shift itself, so the same particles' RELION origins are its negation
        particles["origin_x"], particles["origin_y"] = -particles["origin_x"], -particles["origin_y"]
        log.warning("%s: checkpoint written with the old origin sign; its origins were converted to RELION's "
                    "(rlnOriginXAngst = -shift of the projection in the image); the STAR files of its earlier "
                    "iterations keep the old sign", path)
    return ptr, state, particles


# ------------------------------------------------------------------------------------------- the run
def run(args, comm, mode: str) -> dict:
    cfg = MODES[mode]
    dim = cfg["dim"]
    t_start = time.time()
    if args.continue_dir:
        new_iter = args.iter

        def load():
            ptr, state, particles = _load_checkpoint(args.continue_dir, mode)
            return ptr, state, particles, ptr["args"]

        ptr, state, particles, saved = root_step(comm, load)
        cont_dir = args.continue_dir
        # runs started before these options existed ran without them
        saved = {"folds": 1, "refine_offsets": False, "solvent_mask": None, **saved}
        for k, v in saved.items():
            setattr(args, k, v)
        args.output = cont_dir
        args.continue_dir = cont_dir
        if ptr.get("input"):  # the input by its absolute path (any working directory), checked in _init
            args.input = ptr["input"]["path"]
            args._expected_input = ptr["input"]
        elif comm.rank == 0:
            log.warning("warning: the checkpoint in %s has no record of its input (written by an earlier version): "
                        "%s is not checked against it", cont_dir, args.input)
        if new_iter is not None:
            args.iter = new_iter
    else:
        particles = None
        state = None
        if not args.input or not args.output:
            raise MpiEmError(f"{mode} needs --i STAR and --o DIR (or --continue DIR)")
        # recorded in the checkpoint by absolute path: --continue works from any working directory
        args.input = os.path.abspath(args.input)
        if getattr(args, "auto_mask", False) and getattr(args, "solvent_mask", None):
            raise InputError("--auto-mask", "a solvent mask is given (--solvent-mask): use one or the other")
        for k in ("ref", "solvent_mask"):
            if getattr(args, k, None):
                setattr(args, k, os.path.abspath(getattr(args, k)))
    if args.iter is None:
        args.iter = 20 if mode == "refine3d" else 25
    from ..distributed import agree

    err, res = None, None
    if comm.rank == 0:
        try:
            res = _init(args, mode, comm.size)
        except Exception as e:  # noqa: BLE001 - agreed on by every rank
            err = e
    agree(comm, err)
    plans, meta, ref, star = res if comm.rank == 0 else (None, None, None, None)
    solvent = comm.bcast(meta.pop("solvent_mask") if comm.rank == 0 else None, root=0)
    meta = comm.bcast(meta, root=0)
    folds = meta["folds"]  # resolved on rank 0 (the default depends on the box); 1 outside refine3d
    if MODES[mode]["gold"]:
        args.folds = folds
    # every rank gets its plan; on --continue the per-particle state comes from the checkpoint
    if comm.rank == 0 and particles is not None:
        for p in plans:
            for k in ("half",) + PER_PARTICLE:
                p[k] = particles[k][p["row"]]
    plan = comm.scatter(plans, root=0)
    # the particles STAR written by rank 0: image names that resolve from the output folder
    star_rank0 = (star.optics, rebase_image_names(star, args.output)) if comm.rank == 0 else None
    if state is None:
        state = _initial_state(args, mode, meta, ref) if comm.rank == 0 else None
        state = comm.bcast(state, root=0)
        state["args"] = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "func"}
    else:
        state["args"] = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "func"}
        # checkpoints written before the translational sampling was refined during the run
        for k, v in (("offset_step", args.offset_step), ("offset_range", args.offset_range),
                     ("accuracy_trans", 0.0), ("offset_change", 0.0)):
            state.setdefault(k, float(v))
    device = collective_step(comm, select_device, comm, args.device)
    xp = get_xp(device)
    log_placement(comm, device, log)
    box, apix, K = meta["box"], meta["pixel_size"], meta["K"]
    n_shells = box // 2 + 1
    sym_name = getattr(args, "sym", "C1")
    mask = _mask(box, apix, args, dim, xp, solvent)
    auto_mask = getattr(args, "auto_mask", False) and solvent is None  # --auto-mask: recomputed each iteration
    sym_ops = None
    if dim == 3 and symmetry_matrices(sym_name).shape[0] > 1:
        sym_ops = symmetry_matrices(sym_name)  # applied to the summed accumulators (RELION's symmetrise)
    if comm.rank == 0:
        log.info("%s: %d particles, box %d, %.3f Å/px, K=%d, %d rank(s); rank 0 on %s", mode, meta["n"], box,
                 apix, K, comm.size, device)

    images = ImageCache(xp, cache_wanted(getattr(args, "cache_images", "auto"), xp, len(plan["index"]), box))
    from ..memory import check as memory_check, em_inputs  # stops here (exit 2) if the model does not fit
    mem = memory_check(comm, em_inputs(args, mode, meta, comm.size, device, images.enabled),
                       getattr(args, "max_memory", None), log, args.output,
                       adapt=getattr(args, "owned_accumulators", "off")).inputs  # the batch and accumulators to use
    args.batch = mem.batch
    if comm.rank == 0 and images.enabled:
        log.info("particle images kept in memory between iterations (rank 0: %.2f GB)",
                 4.0 * len(plan["index"]) * box * box / 1e9)
    # first pass (new runs): noise spectrum from the images; 2D references from random subsets
    if state["sigma2"] is None:
        def first_pass():
            geom = SliceGeometry(box, pad=args.pad, xp=xp)
            sh = shell_of_points(geom)
            s_sum, s_cnt = np.zeros(n_shells), np.zeros(n_shells)
            sums = xp.zeros((K, box, box), dtype=xp.float64) if dim == 2 else None
            for sl, imgs in images.batches(plan, args.batch, pinned=pinned_wanted(xp)):  # on xp: one copy
                X, _ = prepare_batch(imgs, plan, sl, geom, box, apix, use_ctf=False)
                a, b = sigma2_from_images(X, sh, n_shells)
                s_sum += a
                s_cnt += b
                if dim == 2:  # per-class sums of the images as one product: one_hot(class)^T @ images
                    cls = xp.asarray(plan["class_number"][sl] - 1)
                    onehot = (cls[:, None] == xp.arange(K)[None, :]).astype(xp.float64)
                    flat = imgs.astype(xp.float64).reshape(len(cls), -1)
                    sums += (onehot.T @ flat).reshape(sums.shape)
            return s_sum, s_cnt, sums
        s_sum, s_cnt, sums = collective_step(comm, first_pass)
        tot = np.concatenate([s_sum, s_cnt])
        allreduce_sum(comm, tot)
        state["sigma2"] = np.where(tot[n_shells:] > 0, tot[:n_shells] / np.maximum(tot[n_shells:], 1), 1.0)
        if dim == 2:
            allreduce_sum(comm, sums)
            counts = np.bincount(plan["class_number"] - 1, minlength=K).astype(np.float64)
            allreduce_sum(comm, counts)
            avg = to_host(sums) / np.maximum(counts, 1)[:, None, None]
            state["maps"] = lowpass(avg, box, apix, box * apix / state["r_cur"]).astype(np.float32)

    stopped = False
    writer = BackgroundWriter() if comm.rank == 0 else None
    while not state["done"] and state["iter"] < args.iter:
        it = state["iter"] + 1
        t_it = time.time()
        final = state["final"] or (it == args.iter)  # known before the iteration (or found after it, below)
        geom = SliceGeometry(box, r_max=state["r_cur"], pad=args.pad, xp=xp)
        shells = shell_of_points(geom)
        inv_s2 = inverse_sigma2_points(state["sigma2"], shells, xp)
        if folds > 1:  # each fold's reference: its half without it (the half map itself before the first)
            ref_maps = state["references"] if state.get("references") is not None else \
                np.repeat(state["maps"], folds, axis=0)
        else:
            ref_maps = state["maps"]
        if auto_mask:  # from the current references, on rank 0, the same on every rank
            solvent = comm.bcast(auto_solvent_mask(state["maps"], state["resolution"][-1] if state["resolution"]
                                                   else args.ini_high, apix, _mask_radius(box, apix, args))
                                 if comm.rank == 0 else None, root=0)
            mask = _mask(box, apix, args, dim, xp, solvent)
        refs = References(xp.asarray(ref_maps), dim, args.pad, mask=mask)
        if dim == 3:
            step = angular_step(state["order"])
        else:
            step = args.psi_step
        # the grids' random perturbation (RELION's): angles by p x step, translations by p x offset step
        state["perturb"] = next_perturbation(state.get("perturb", 0.0), getattr(args, "perturb", 0.0), args.seed,
                                             it)
        glob = None if state["local"] else global_grid(dim, state["order"], sym_name, xp, psi_step=step,
                                                       perturb_deg=state["perturb"] * step)
        spec = SearchSpec(
            dim=dim, n_classes=K, global_mats=glob,
            local_mats=local_offsets(dim, step, 1.5, xp) if state["local"] else None,
            fine_mats=fine_offsets(dim, step, xp), offset_range=state["offset_range"],
            offset_step=state["offset_step"], offset_sigma=state["offset_sigma"],
            offset_perturb=state["perturb"] * state["offset_step"],
            n_select=args.n_select,
            class_select=int(getattr(args, "class_select", 10)),
            log_class_prior=xp.asarray(np.log(np.maximum(state["class_prior"], 1e-10)), dtype=xp.float32),
            fixed_class=(it == 1 and K > 1 and dim == 3))
        V = 2 * folds if cfg["gold"] else K
        vol_shape = geom.vol_shape if dim == 3 else (geom.npad, geom.npad // 2 + 1)
        prev = {k: plan[k].copy() for k in ("rot", "tilt", "psi", "origin_x", "origin_y")}

        # MPI_EM_TIMING_DETAIL=1: steps inside the phases too (run_timings.json's detail_seconds; more device
        # synchronisations, so for diagnosis rather than for timing runs)
        timer = PhaseTimer(xp, detail=os.environ.get("MPI_EM_TIMING_DETAIL") == "1")

        def e_step():
            F_acc, W_acc = e_step_accumulators(comm, V, vol_shape, xp, mem.owned_accumulators, sym_ops)
            stats = Stats.zeros(n_shells, K)
            done = 0
            batches = batch_rounds(F_acc, images.batches(plan, args.batch, pinned=pinned_wanted(xp)),
                                   len(plan["index"]), args.batch)
            while True:
                with timer("read"):  # waiting for the prefetched batch
                    item = next(batches, None)
                if item is None:
                    break
                sl, imgs = item
                with timer("prepare"):
                    X, ctf = prepare_batch(imgs, plan, sl, geom, box, apix, use_ctf=not args.no_ctf,
                                       intact_first_peak=getattr(args, "ctf_intact_first_peak", False))
                base = xp.asarray(reference_group(plan["half"][sl], plan["row"][sl], folds) * K) if cfg["gold"] \
                    else xp.zeros(sl.stop - sl.start, dtype=xp.int64)
                res = expectation_batch(X, ctf, inv_s2, shells, refs, base, current_mats(plan, sl, dim, xp),
                                        xp.asarray(plan["class_number"][sl] - 1), spec, geom, F_acc, W_acc,
                                        stats, n_shells, timer=timer,
                                        prior_offsets=image_shifts_px(plan, sl, apix))
                update_plan_poses(plan, sl, res, dim, apix)
                done += sl.stop - sl.start
            if sym_ops is not None and W_acc is not None:  # linear: each rank symmetrises its partial sums
                with timer("symmetrise"):
                    symmetrise(F_acc, W_acc, sym_ops)
            synchronize(xp)
            return F_acc, W_acc, stats

        t_e = time.time()
        F_acc, W_acc, stats = collective_step(comm, routed_step(e_step))
        end_e_step(refs, spec, xp)
        t_e = time.time() - t_e
        vec = stats.as_vector()
        allreduce_sum(comm, vec)
        stats = Stats.from_vector(vec, n_shells, K)
        t_m = time.time()
        info = {"loglike": stats.loglike}
        if auto_mask:
            info["auto_mask"] = solvent  # written as run_itNNN_mask.mrc
        if dim == 3:
            maps, inf = reduce_and_reconstruct_3d(comm, F_acc, W_acc, box, args.pad, state["r_cur"],
                                                  args.tau2_fudge, cfg["gold"], mask=mask, fsc_mask=solvent,
                                                  compress=args.compress, combined=cfg["gold"],
                                                  timer=timer, folds=folds)
        else:
            maps, inf = reduce_and_reconstruct_2d(comm, F_acc, W_acc, box, args.pad, state["r_cur"],
                                                  args.tau2_fudge, timer=timer)
        del F_acc, W_acc
        state["references"] = to_host(inf.pop("references")) if "references" in inf else None
        info.update(inf)
        maps_h = to_host(maps)
        check_finite_maps(maps_h, it)  # the same maps on every rank: every rank stops here, nobody waits
        if dim == 2 and not args.no_center:
            maps_h = _center_2d(maps_h)
        state["maps"] = maps_h
        if info.get("combined") is not None:
            info["combined"] = to_host(info["combined"])
        t_m = time.time() - t_m

        # ---------------- model updates (identical on every rank: from reduced sums)
        cnt = stats.sigma2_count
        state["sigma2"] = np.where(cnt > 0, stats.sigma2_sum / np.maximum(cnt, 1), state["sigma2"])
        if stats.class_weight.sum() > 0:
            state["class_prior"] = stats.class_weight / stats.class_weight.sum()
        state.setdefault("class_history", []).append([float(x) for x in state["class_prior"]])
        if mode != "refine3d" and getattr(args, "reseed_below", 0) > 0 and not final:
            done_k = _reseed_classes(state, args.reseed_below, args.seed, it, box, apix)
            if done_k and comm.rank == 0:
                log.info("iteration %d: re-seeded class(es) %s from the largest class", it,
                         ", ".join(str(k + 1) for k in done_k))
        if stats.offset_w > 0:
            state["offset_sigma"] = float(np.clip(np.sqrt(stats.offset_sq / (2 * stats.offset_w)),
                                                  args.offset_step, args.offset_range))
        if dim == 3:
            A0 = euler_to_matrix(prev["rot"], prev["tilt"], prev["psi"])
            A1 = euler_to_matrix(plan["rot"], plan["tilt"], plan["psi"])
            ch = angular_distance(A0, A1, sym=None if sym_name.upper() == "C1" else symmetry_matrices(sym_name))
        else:
            ch = np.abs((plan["psi"] - prev["psi"] + 180) % 360 - 180)
        moved = np.hypot(plan["origin_x"] - prev["origin_x"], plan["origin_y"] - prev["origin_y"]) / apix
        tot = np.array([ch.sum(), len(ch), moved.sum()], dtype=np.float64)
        allreduce_sum(comm, tot)
        state["ang_change"].append(float(tot[0] / max(tot[1], 1)))
        state["offset_change"] = float(tot[2] / max(tot[1], 1))       # px, mean over particles
        state["accuracy"] = stats.angle_spread / max(stats.offset_w, 1)
        state["accuracy_trans"] = float(np.sqrt(stats.offset_var / max(stats.offset_w, 1)))  # px, per axis
        # refine3d: the half maps' FSC on their device (two 128^3 FFTs: 0.16 s on a host core, ~1 ms on a GPU)
        _schedule(state, info, mode, args, box, apix, maps if cfg["gold"] else maps_h, mask, final,
                  masked=solvent is not None)
        state["iter"] = it
        if final or state["final"]:
            # converged (or the last allowed iteration): no further iteration. RELION runs one more after
            # convergence, whose E-step uses the full image size; ours would repeat the same sampling and size, and
            # after the peak it makes the map worse (benchmarks/results/issue4-monotonic/). The final outputs are
            # those of the best gold-standard iteration (final_iteration), this one or an earlier one.
            state["done"] = True

        particles = _gather_particles(comm, plan)
        _record_timings(comm, args.output, it, time.time() - t_it, t_e, t_m, timer, len(plan["index"]),
                        time.time() - t_start)
        if comm.rank == 0:
            info["fsc"] = info.get("fsc_gold")
            if info["fsc"] is None:
                info.pop("fsc")
            res_txt = f", resolution {state['resolution'][-1]:.2f} Å" if state["resolution"] else ""
            log.info("iteration %d: E-step %.1f s, M-step %.1f s, mean pose change %.2f° / %.2f px, accuracy %.2f° / "
                     "%.2f px%s, next order %d%s, offsets step %.2f px range %.2f px, r %.0f px", it, t_e, t_m,
                     state["ang_change"][-1], state["offset_change"], state["accuracy"], state["accuracy_trans"],
                     res_txt, state["order"], " (local)" if state["local"] else "", state["offset_step"],
                     state["offset_range"], state["r_cur"])
        # rank 0 writes this iteration's outputs while every rank computes the next one; the previous iteration's
        # writing must have succeeded (a failure there stops every rank here, cleanly)
        def hand_over():  # rank 0; its failure (the previous files, or starting the writer) stops every rank
            writer.wait()
            writer.submit(_write_iteration, args.output, it, mode, star_rank0, particles, _snapshot(state), info,
                          meta)

        root_step(comm, hand_over)
        stop_after = os.environ.get("MPI_EM_STOP_AFTER_ITERATION")
        if stop_after and int(stop_after) == it:  # test hook: behave like a job killed after a finished iteration
            stopped = True
            break
    root_step(comm, writer.wait if writer else None)
    if writer is not None:
        writer.close()
    if state["done"]:  # after the last iteration's files; again on --continue of a finished run (a run killed
        # while its final files were being copied)
        root_step(comm, _write_final, args.output, state["iter"], mode, state)
    summary = {"mode": mode, "iterations": state["iter"], "resolution": state["resolution"][-1]
               if state["resolution"] else None, "class_prior": list(map(float, state["class_prior"])),
               "seconds": time.time() - t_start, "ranks": comm.size, "device_rank0": device, "stopped": stopped}
    if state["done"] and cfg["gold"]:
        best = final_iteration(state["resolution"], True, state["iter"])
        summary.update(final_iteration=best, resolution=state["resolution"][best - 1])
    if comm.rank == 0:
        log.info("%s finished: %d iterations in %.1f s", mode, state["iter"], summary["seconds"])
    return summary


def check_finite_maps(maps, it: int) -> None:
    """Stop the job with a clear error when an iteration's maps hold NaN or infinity (a numerical failure would
    otherwise look like a refinement that converged at the box size: benchmarks/results/refine3d-convergence/, zero-variance prior)."""
    bad = ~np.isfinite(maps)
    if bad.any():
        raise MpiEmError(f"iteration {it}: the reconstructed maps hold {int(bad.sum())} NaN or infinite voxels "
                         f"(of {maps.size}); stopping instead of refining against them")


def _record_timings(comm, out, it, t_iter, t_e, t_m, timer, n_local, since_start) -> None:
    """Per-phase seconds, GEMM flops and bytes of every rank for this iteration -> rank 0 appends them to
    ``run_timings.json`` (atomically), read by the scaling benchmarks. ``seconds_iteration`` is the iteration's
    compute; ``seconds_since_start`` (rank 0's clock at the same point) also counts what lies between iterations
    (waiting for the previous iteration's files), so its differences are the wall clock per iteration."""
    mine = dict(timer.as_dict(), n_particles=n_local, seconds_estep=t_e, seconds_mstep=t_m)
    every = comm.gather(mine, root=0)

    def write():  # rank 0, agreed on by every rank (a full disk ends the job on every rank, nobody waits)
        path = os.path.join(out, "run_timings.json")
        rows = json.load(open(path)) if os.path.exists(path) else []
        rows = [r for r in rows if r["iteration"] < it]
        rows.append({"iteration": it, "ranks": comm.size, "seconds_iteration": t_iter,
                     "seconds_since_start": since_start, "per_rank": every})
        with atomic_path(path) as tmp:
            with open(tmp, "w") as f:
                json.dump(rows, f, indent=1)

    root_step(comm, write)


def _schedule(state, info, mode, args, box, apix, maps, mask, final, masked=False):
    """Resolution, current image size and (refine3d) the auto-sampling / convergence decisions."""
    cfg = MODES[mode]
    if cfg["gold"]:
        # unmasked, as RELION's refinement does: a mask shared by both halves correlates their high frequencies;
        # with --solvent-mask the solvent-corrected FSC that set tau^2 (RELION's --solvent_correct_fsc)
        curve = info["fsc_unregularised"].copy() if masked else fsc(maps[0], maps[1])
        # only shells up to the current size carry data; beyond it both halves share the leakage of the crop
        curve[int(np.floor(state["r_cur"])) + 1:] = 0.0
        info["fsc_gold"] = curve
        res = resolution_at(curve, box, apix)
        state["resolution"].append(res)
        shell = box * apix / res
        state["r_cur"] = float(min(default_r_max(box), max(state["r_cur"], np.ceil(shell) + 3)))
        improved = res < 0.99 * state["best_res"]
        state["best_res"] = min(state["best_res"], res)
        step = angular_step(state["order"])
        small_change = state["ang_change"][-1] < step
        # RELION's auto-sampling: refine the sampling when the resolution or the poses stop improving, but only
        # while the step is coarser than the angular accuracy the posteriors show; otherwise converge.
        # the posterior spread of a global search; of a local one only when well inside its window (radius
        # 1.5 steps): a spread as wide as the window is truncated by it
        if not state["local"] or state["accuracy"] < 0.75 * step:
            state["accuracy_global"] = state["accuracy"]
        if not improved or small_change:
            if state["order"] < args.max_order and step > state.get("accuracy_global", 0.0):
                state["order"] += 1
                if getattr(args, "refine_offsets", False):
                    # the translations follow (RELION's): a fine step a quarter below the translational accuracy,
                    # a range of 5 x the last offset change, 9 to ~49 coarse translations
                    state["offset_step"], state["offset_range"] = next_translations(
                        state["offset_step"], state["offset_range"], state["accuracy_trans"],
                        state["offset_change"])
                if state["order"] >= args.local_from_order:
                    state["local"] = True
                state["no_improve"] = 0
            elif not improved:
                state["no_improve"] += 1
                if state["no_improve"] >= 1:
                    state["final"] = True
    else:
        # classification: data-vs-prior SSNR per shell; the current size follows the last shell with SSNR >= 1
        tau2 = np.atleast_2d(info.get("tau2"))
        mw = info.get("mean_w")
        if mw is not None:
            ssnr = (tau2 * np.atleast_2d(mw)).max(axis=0)
            good = np.flatnonzero(ssnr[1:] >= 1.0)
            if good.size:
                shell = good.max() + 1
                state["r_cur"] = float(min(default_r_max(box), max(state["r_cur"], shell + 3)))
                state["resolution"].append(float(box * apix / max(shell, 1)))


def _class_resolutions(info, K, box, apix, gold, state):
    """Per class: Å of the last shell whose data-vs-prior SSNR (tau^2 x mean W) is >= 1 (classification), or
    the gold-standard resolution (refine3d)."""
    if gold:
        r = state["resolution"][-1] if state["resolution"] else 0.0
        return np.full(K, float(r))
    tau2, mw = info.get("tau2"), info.get("mean_w")
    out = np.zeros(K)
    if tau2 is None or mw is None:
        return out
    ssnr = np.atleast_2d(tau2) * np.atleast_2d(mw)
    for k in range(min(K, ssnr.shape[0])):
        good = np.flatnonzero(ssnr[k, 1:] >= 1.0)
        out[k] = box * apix / (good.max() + 1) if good.size else 999.0
    return out


def _reseed_classes(state, below, seed, it, box, apix, amplitude=0.2):
    """Classes with a share under ``below`` / K take over half of the largest class, split symmetrically as in
    vector quantisation (Linde-Buzo-Gray): the largest class's reference m becomes m + e and the re-seeded one
    m - e, with e seeded Gaussian noise low-passed to the current size at ``amplitude`` x the standard deviation
    of m; each gets half of the largest class's prior. The same on every rank and for
    every number of ranks (the noise is seeded by seed, iteration and class). Returns the re-seeded classes."""
    prior = np.asarray(state["class_prior"], dtype=np.float64).copy()
    maps = np.asarray(state["maps"]).copy()
    K = len(prior)
    out = []
    if K < 2:
        return out
    for k in np.flatnonzero(prior < below / K):
        big = int(np.argmax(prior))
        rng = np.random.default_rng([int(seed), int(it), int(k)])
        noise = lowpass(rng.standard_normal(maps[big].shape), box, apix, box * apix / state["r_cur"])
        noise *= amplitude * float(maps[big].std()) / max(float(noise.std()), 1e-30)
        # split symmetrically (m + e, m - e): neither copy is favoured, the data decide which members go where
        maps[k] = (maps[big] - noise).astype(maps.dtype)
        maps[big] = (maps[big] + noise).astype(maps.dtype)
        prior[k] = prior[big] = 0.5 * prior[big]
        out.append(int(k))
    state["maps"], state["class_prior"] = maps, prior
    return out


def _center_2d(maps):
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
