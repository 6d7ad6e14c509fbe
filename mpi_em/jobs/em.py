"""The EM jobs: `refine3d` (gold-standard 3D auto-refine), `class3d` and `class2d` — one driver, three modes
(:class:`mpi_em.em.state.Mode`).

Per iteration, on every rank: E-step over the rank's particles (batched, :mod:`mpi_em.em.engine`), then the
M-step: accumulators reduced (3D: stride-distributed volume) and references reconstructed with a tau^2 prior
(:mod:`mpi_em.em.model`), sigma^2 / class priors / offset prior updated from sums over ranks, then the schedule
(:mod:`mpi_em.em.schedule`). Rank 0 writes the iteration's outputs and a checkpoint (:mod:`mpi_em.em.outputs`,
:class:`mpi_em.em.state.EMState`), so `--continue DIR` resumes from the last finished iteration with the same
result as an uninterrupted run.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Callable

from .. import config, plots
from ..backend import get_xp
from ..distributed import agree, bcast_large, collective_step, log_placement, root_step, select_device
from ..em.inputs import default_folds, read_inputs  # noqa: F401 - default_folds: benchmarks
from ..em.outputs import gather_particles, record_timings, write_figures, write_final, write_iteration
from ..em.schedule import final_iteration
from ..em.state import MODES, PER_PARTICLE, EMState, Mode
from ..em.steps import (EMRun, LightenedEStep, expectation, first_pass, full_size_wanted, maximisation,
                        references, update_model)
from ..errors import InputError, MpiEmError
from ..fourier import SliceGeometry, default_r_max
from ..io import BackgroundWriter, rebase_image_names
from ..io.disk import disk_outlook
from ..particles import ImageCache, cache_wanted
from ..symmetry import symmetry_matrices
from ..timing import PhaseTimer
from . import add_job_folder_arguments, positive_int, restore_options

log = logging.getLogger("mpi_em")


# -------------------------------------------------------------------------------------------- options
def add_arguments(p, mode: str) -> None:
    cfg = MODES[mode]
    add_job_folder_arguments(p)
    if cfg.dim == 3:
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
        p.add_argument("--local-radius", type=float, default=1.5, metavar="STEPS",
                       help="local searches: the rotations within this many angular steps of the previous pose "
                            "(default 1.5: 19 rotations; 3: 123)")
        p.add_argument("--local-sigma", type=float, default=0.0, metavar="STEPS",
                       help="local searches: a Gaussian prior of this width, in angular steps, on the angle from "
                            "the previous pose, in the coarse and the fine pass (RELION's auto-refine: 1 step "
                            "within 3; default 0: uniform within --local-radius)")
    if mode != "refine3d":
        p.add_argument("--K", type=int, default=4 if cfg.dim == 3 else 10, help="number of classes")
    p.add_argument("--incr-size", type=int, default=3 if mode == "class2d" else 10, metavar="SHELLS",
                   help="the current image size: the resolution's shell (refine3d: gold-standard; classification: "
                        "the best class's last shell of the run from shell 1 where the data-vs-prior SSNR stays "
                        ">= 1, at least shell 5, as RELION's) plus this many shells, recomputed every iteration "
                        "(it shrinks when the resolution does, as RELION's); the first: class3d the start's shell "
                        "round(box x apix / --ini-high) plus this, class2d shell round(0.07 x box) plus this (both "
                        "RELION's), refine3d the start's shell rounded up plus 2 (RELION's + 10 made the first "
                        "iteration's two halves of one start its best gold-standard figure, "
                        "benchmarks/results/initial-model/refine-first-size-cpu-2026-12-05/) "
                        "(RELION's --incr_size, 10 in every RELION job; default 10, "
                        "class2d 3: on the CPU at box 64 and 128 its classes grouped views as well as with 10 in "
                        "3.4-4.1x less time, benchmarks/results/class2d-size/cpu-2026-12-05/). class3d on one "
                        "H200, 5 iterations: maps "
                        "0.5-0.8 Å closer to the truth than with 3 for 2-13%% more time per iteration "
                        "(benchmarks/results/relion-side-by-side/h200-classes-box360-2026-12-05/); on CPU ranks 10 took "
                        "2.3x the time of 3 for the same maps at box 64 "
                        "(benchmarks/results/class3d-prior/cpu-incr-size-2026-12-05/)")
    if mode == "refine3d":
        p.add_argument("--max-order", type=int, default=8,
                       help="finest HEALPix order the auto-refinement may reach (default 8 = 0.23°); it refines the "
                            "sampling only while the step is coarser than the measured angular accuracy, as RELION "
                            "does")
        p.add_argument("--no-final-full-size", dest="final_full_size", action="store_false",
                       help="do not run the last iteration (after convergence, or --iter's) at the full image size; "
                            "by default it is, as RELION's auto-refine does, so that the final map holds data to "
                            "Nyquist")
        p.add_argument("--fsc-jump", action=argparse.BooleanOptionalAction, default=True,
                       help="while the half maps' FSC at the edge of the current size is above 0.2 (the resolution "
                            "is limited by the size, not by the data) and the mean largest posterior weight above "
                            "0.1, grow the size by box / 8 shells instead of --incr-size (RELION's auto-refine "
                            "rule; default on, --no-fsc-jump: --incr-size only)")
        p.add_argument("--settle-poses", action="store_true",
                       help="refine the sampling and converge only once the poses have settled as well: the mean "
                            "orientation and offset changes no longer falling (no more than 3%% below the smallest "
                            "so far) or below 0.4 of the fine sampling's steps, as RELION's auto-refine does unless "
                            "--auto_ignore_angles; by default the resolution alone decides (on an SNR-0.05 set the "
                            "rule added 0 and 4 iterations at the same sampling for the same maps, "
                            "benchmarks/results/initial-model/refine-settle-poses-cpu-2026-12-06/)")
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
        p.add_argument("--direction-prior", action=argparse.BooleanOptionalAction, default=True,
                       help="a prior per class and projection direction, from the last iteration's posterior weights "
                            "(RELION's pdf_direction, used by its global searches; its sum over the directions is "
                            "the class's share): a class rarely seen from a direction is rarely chosen there. On "
                            "one structure at box 256 its classes merged a little more (the largest held 53-97%% "
                            "against 50-71%% at three seeds) and its maps were as good or better (default on; "
                            "--no-direction-prior: one prior per class)")
    if cfg.dim == 2:
        p.add_argument("--psi-step", type=float, default=10.0, help="in-plane angular step, degrees (default 10)")
        p.add_argument("--no-center", action="store_true", help="do not re-centre the class averages")
    if mode != "refine3d":
        reseed_default = 0.0 if mode == "class3d" else 0.2
        p.add_argument("--reseed-below", type=float, default=reseed_default, metavar="F",
                       help="re-seed a class whose share of the particles falls below F / K: its reference "
                            "becomes a seeded, perturbed copy of the largest class's, which it splits with "
                            f"(default {reseed_default:g}; 0 = never. class3d: never, as RELION; on one structure at "
                            "box 256 re-seeding kept 4 classes of it, the largest class map 0.5-1 Å further from the "
                            "truth than without. class2d: 0.2, which kept more classes of a compact particle)")
        from ..em.classes import RESEED_AMPLITUDE

        p.add_argument("--reseed-amplitude", type=float, default=RESEED_AMPLITUDE, metavar="A",
                       help="the perturbation that splits a re-seeded class from the largest one, x the standard "
                            "deviation of that class's map (default %(default)s; larger values made the classes of a "
                            "compact particle collapse and re-seed in turn)")
    p.add_argument("--iter", type=int, default=None,
                   help="maximum number of iterations (default 25; refine3d: 20, and it stops earlier when "
                        "converged); with --continue, the new limit")
    p.add_argument("--particle-diameter", type=float, default=None,
                   help="diameter of the soft spherical mask, Å (default: 80%% of the box)")
    zero_default = mode == "class3d"
    p.add_argument("--zero-mask", action=argparse.BooleanOptionalAction, default=zero_default,
                   help="search poses, and take the noise power and the log-likelihood, on the particle images "
                        "masked by --particle-diameter (background set to its mean, 5-px soft edge), while the "
                        "unmasked images are inserted, as RELION's --zero_mask (its GUI's default). The masked "
                        "images hold less noise: a lower noise power weighs the data more against the prior "
                        f"(default: {'on' if zero_default else 'off'}; on for class3d, whose box-256 map it made 16%% "
                        "finer; off for refine3d and class2d, where it measured no better)")
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
    p.add_argument("--tau2-fudge", type=float, default=cfg.fudge,
                   help=f"regularisation T: weight of the data against the prior (default {cfg.fudge:g})")
    p.add_argument("--n-select", type=int, default=4,
                   help="at most this many coarse poses per particle go to the oversampled fine pass: the best "
                        "ones until they hold 99.9%% of the coarse posterior (RELION's significant samples; "
                        "default 4)")
    if mode != "refine3d":
        p.add_argument("--class-select", type=int, default=10,
                       help="per particle, besides the --n-select best poses of its most probable class, the fine "
                            "pass refines the best pose of each of the next most probable classes up to this many "
                            "classes, so that class memberships stay soft (default 10)")
    p.add_argument("--batch", type=positive_int, default=None,
                   help="particles per E-step batch (default: on GPU ranks 1024 x (128 / box)^2 between 64 and 1024, "
                        "i.e. 1024 at box 128, 256 at box 256, 64 from box 512, lowered first where the memory "
                        "model says its workspace does not fit; 64 on CPU ranks)")
    p.add_argument("--cache-images", choices=["auto", "on", "off"], default="auto",
                   help="keep each rank's particle images in its memory between iterations instead of reading them "
                        "again (auto: on GPU ranks whose images fit in a quarter of the free GPU memory, and off "
                        "where the job's memory model would not fit its limit otherwise; CPU ranks read through "
                        "the operating system's page cache)")
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


# ------------------------------------------------------------------------------------------- the run
def run(args, comm, after_iteration: Callable[[int], bool] | None = None) -> dict:
    """The EM job ``args.mode``. ``after_iteration(it)`` is called on every rank after each finished iteration
    (its files handed to the writer); True stops the run there, as a job killed after that iteration (tests of
    ``--continue``; subprocess tests set ``MPI_EM_STOP_AFTER_ITERATION``, :mod:`mpi_em.config`)."""
    mode = MODES[args.mode]
    if after_iteration is None and config.stop_after_iteration():
        stop = config.stop_after_iteration()
        after_iteration = lambda it: it == stop  # noqa: E731
    t_start = time.time()
    state, particles = _resume(args, comm, mode) if args.continue_dir else _start(args, mode)
    if args.iter is None:
        args.iter = 20 if mode.refine else 25
    # rank 0's writer; the plotting library imported while the job sets up, not in every iteration's writer
    writer = BackgroundWriter(preload=plots.preload) if comm.rank == 0 else None
    job = _setup(args, comm, mode, state, particles)
    state = job.state
    if state.sigma2 is None:  # new runs: noise spectrum from the images; 2D references from random subsets
        first_pass(job)
    stopped = False
    first_it = state.iter + 1  # the first iteration this run writes (after a --continue, the one after the last)
    while not state.done and state.iter < args.iter:
        it = state.iter + 1
        t_it = time.time()
        final = state.final or (it == args.iter)  # known before the iteration (or found after it, below)
        if final and full_size_wanted(args, mode, state.r_cur, job.box):
            state.r_cur = float(default_r_max(job.box))  # RELION's last auto-refine iteration: all the data
            if comm.rank == 0:
                log.info("iteration %d: the last one, at the full image size (r %d px)", it, state.r_cur)
        geom = SliceGeometry(job.box, r_max=state.r_cur, pad=args.pad, xp=job.xp)
        prev = {k: job.plan[k].copy() for k in ("rot", "tilt", "psi", "origin_x", "origin_y")}
        # MPI_EM_TIMING_DETAIL: steps in the phases; on the driver's pool (a memory limit) every step synchronised
        timer = PhaseTimer(job.xp, detail=config.timing_detail(), step_sync=job.step_sync)
        t_r = time.time()
        refs = references(job)  # held until the next iteration's, as the memory model (mpi_em.memory) counts
        t_r = time.time() - t_r
        t_e = time.time()
        acc, stats = expectation(job, it, geom, refs, timer)
        t_e = time.time() - t_e
        t_m = time.time()
        maps, info = maximisation(job, it, acc, stats, timer)
        t_m = time.time() - t_m
        t_u = time.time()
        update_model(job, it, stats, info, maps, prev, final)
        t_u = time.time() - t_u
        del maps  # the device maps (the state holds them on the host): not through the next E-step
        parts = {"references": t_r, "estep": t_e, "mstep": t_m, "update": t_u}
        _write(job, it, info, writer, timer, time.time() - t_it, parts, t_start, first_it)
        if after_iteration is not None and after_iteration(it):
            stopped = True
            break
    root_step(comm, writer.wait if writer else None)
    if writer is not None:
        writer.close()
    if state.done:  # after the last iteration's files; again on --continue of a finished run (a run killed
        # while its final files were being copied)
        root_step(comm, write_final, args.output, state.iter, mode.gold, state.resolution)
    summary = {"mode": mode.name, "iterations": state.iter, "resolution": state.resolution[-1]
               if state.resolution else None, "class_prior": list(map(float, state.class_prior)),
               "seconds": time.time() - t_start, "ranks": comm.size, "device_rank0": job.device, "stopped": stopped}
    if state.done and mode.gold:
        best = final_iteration(state.resolution, True, state.iter)
        summary.update(final_iteration=best, resolution=state.resolution[best - 1])
    if comm.rank == 0:
        log.info("%s finished: %d iterations in %.1f s", mode.name, state.iter, summary["seconds"])
    return summary


def _start(args, mode: Mode):
    if not args.input or not args.output:
        raise MpiEmError(f"{mode.name} needs --i STAR and --o DIR (or --continue DIR)")
    # recorded in the checkpoint by absolute path: --continue works from any working directory
    args.input = os.path.abspath(args.input)
    if getattr(args, "auto_mask", False) and getattr(args, "solvent_mask", None):
        raise InputError("--auto-mask", "a solvent mask is given (--solvent-mask): use one or the other")
    for k in ("ref", "solvent_mask"):
        if getattr(args, k, None):
            setattr(args, k, os.path.abspath(getattr(args, k)))
    return None, None


def _resume(args, comm, mode: Mode):
    """--continue: the state and particles of the last finished iteration; the run's options from its checkpoint
    (a new --iter replaces the limit)."""
    new_iter, cont_dir = args.iter, args.continue_dir
    ptr, state, particles = root_step(comm, EMState.load, cont_dir, mode)
    restore_options(args, ptr["args"])
    args.output = args.continue_dir = cont_dir
    if ptr.get("input"):  # the input by its absolute path (any working directory), checked in read_inputs
        args.input = ptr["input"]["path"]
        args._expected_input = ptr["input"]
    elif comm.rank == 0:
        log.warning("warning: the checkpoint in %s has no record of its input (written by an earlier version): "
                    "%s is not checked against it", cont_dir, args.input)
    if new_iter is not None:
        args.iter = new_iter
    return state, particles


def _setup(args, comm, mode: Mode, state: EMState | None, particles: dict | None) -> EMRun:
    """Inputs read on rank 0, plans scattered, the device chosen, the memory model checked."""
    err, res = None, None
    if comm.rank == 0:
        try:
            res = read_inputs(args, mode, comm.size)
        except Exception as e:  # noqa: BLE001 - agreed on by every rank
            err = e
    agree(comm, err)
    plans, meta, ref, star = res if comm.rank == 0 else (None, None, None, None)
    solvent = bcast_large(comm, meta.pop("solvent_mask") if comm.rank == 0 else None)
    meta = comm.bcast(meta, root=0)
    if mode.gold:
        args.folds = meta["folds"]
    # every rank gets its plan; on --continue the per-particle state comes from the checkpoint
    if comm.rank == 0 and particles is not None:
        for p in plans:
            for k in ("half",) + PER_PARTICLE:
                p[k] = particles[k][p["row"]]
    plan = comm.scatter(plans, root=0)
    star_rank0 = (star.optics, rebase_image_names(star, args.output)) if comm.rank == 0 else None
    box, apix, K = meta["box"], meta["pixel_size"], meta["K"]
    if state is None:
        state = bcast_large(comm, EMState.initial(args, mode, box, apix, K, ref) if comm.rank == 0 else None)
    state.args = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "func"}
    device = collective_step(comm, select_device, comm, args.device)
    xp = get_xp(device)
    log_placement(comm, device, log)
    sym = symmetry_matrices(getattr(args, "sym", "C1")) if mode.dim == 3 else None
    if comm.rank == 0:
        log.info("%s: %d particles, box %d, %.3f Å/px, K=%d, %d rank(s); rank 0 on %s", mode.name, meta["n"], box,
                 apix, K, comm.size, device)
    cache = getattr(args, "cache_images", "auto")
    from ..memory import check as memory_check, default_batch, em_inputs  # stops here (exit 2) if it does not fit
    batch_floor = None
    if args.batch is None:  # the default's batch for this box and device, lowered first where it does not fit
        # the smallest rank's: one batch on every rank, so that the check's steps are the same collectives on all
        args.batch = min(comm.allgather(default_batch(box, "cpu" if device == "cpu" else "gpu")))
        batch_floor = min(args.batch, default_batch(box, "cpu"))
    mem = memory_check(comm, em_inputs(args, mode.name, meta, comm.size, device,
                                       cache_wanted(cache, xp, len(plan["index"]), box)),
                       getattr(args, "max_memory", None), log, args.output,
                       adapt=getattr(args, "owned_accumulators", "off"),
                       precision=getattr(args, "accumulate", "double"), cache=cache,
                       batch_floor=batch_floor).inputs  # what the job uses
    images = ImageCache(xp, mem.cache_images)
    from ..memory import estimate, job_limit, keep_fft_plans
    from ..memory.limits import gpu_allocator_of

    limit = job_limit(comm, mem, getattr(args, "max_memory", None))
    lighter = mem.batch < args.batch or bool(mem.grid_chunk)  # the E-step sized to the limit: re-sized per iteration
    # the cuFFT plans stay between phases where the model leaves them room; not where the E-step is sized to the
    # limit (each iteration's batch then fills it)
    kept = keep_fft_plans(xp, None if lighter else estimate(mem), limit)
    if comm.rank == 0 and kept:
        log.info("memory: cuFFT plans kept between phases, up to %.3g GiB of work areas (room under the limit)",
                 kept / 2 ** 30)
    step_sync = gpu_allocator_of(mem) == "async"
    if comm.rank == 0 and step_sync:
        log.info("memory: the driver's memory pool (a memory limit): each E-step step ends with a synchronisation, "
                 "where the pool gives back what the step freed")
    lightened = None
    if lighter:  # chosen for the largest size and grid: re-chosen per iteration
        lightened = LightenedEStep(mem, limit, int(args.batch))
    args.batch = mem.batch
    args.grid_chunk = mem.grid_chunk
    if comm.rank == 0 and images.enabled:
        log.info("particle images kept in memory between iterations (rank 0: %.2f GB)",
                 4.0 * len(plan["index"]) * box * box / 1e9)
    return EMRun(args, comm, mode, state, plan, meta, star_rank0, device, xp, solvent,
                sym if sym is not None and sym.shape[0] > 1 else None, images,
                 owned_accumulators=mem.owned_accumulators, accumulate=mem.accumulate, memory=lightened,
                 auto_mask=getattr(args, "auto_mask", False) and solvent is None,
                 step_sync=step_sync)


def class_sizes_text(class_prior) -> str:
    """The classes' shares of the particles for the iteration's log line (as the E-step found them, before any
    re-seeding): ``, classes 50.1/49.9/0.0%`` (in class order) for 2 <= K <= 8; for more, the largest share and how
    many classes hold at least 1%; ``""`` for K = 1."""
    p = [] if class_prior is None else [float(x) for x in class_prior]
    if len(p) < 2:
        return ""
    if len(p) <= 8:
        return ", classes " + "/".join(f"{100 * x:.1f}" for x in p) + "%"
    return f", largest class {100 * max(p):.1f}%, {sum(x >= 0.01 for x in p)} of {len(p)} classes >= 1%"


def _write(job: EMRun, it: int, info: dict, writer, timer, t_iter: float, parts: dict, t_start: float,
           first_written: int) -> None:
    """Timings of every rank (``parts``: seconds of the references, E-step, M-step and model update); rank 0 logs
    the iteration and hands its files to the background writer, and once the files of ``first_written`` (this
    run's first iteration) are on disk, warns where the files of the iterations still allowed would not fit there
    (:func:`mpi_em.io.disk.disk_outlook`)."""
    comm, state = job.comm, job.state
    particles = gather_particles(comm, job.plan)
    record_timings(comm, job.args.output, it, t_iter, parts, timer, len(job.plan["index"]), time.time() - t_start)
    if comm.rank == 0:
        info["fsc"] = info.get("fsc_gold")
        if info["fsc"] is None:
            info.pop("fsc")
        res_txt = f", resolution {state.resolution[-1]:.2f} Å" if state.resolution else ""
        log.info("iteration %d: E-step %.1f s, M-step %.1f s, mean pose change %.2f° / %.2f px, accuracy %.2f° / "
                 "%.2f px%s, next order %d%s, offsets step %.2f px range %.2f px, r %.0f px%s", it, parts["estep"],
                 parts["mstep"], state.ang_change[-1], state.offset_change, state.accuracy, state.accuracy_trans,
                 res_txt, state.order, " (local)" if state.local else "", state.offset_step, state.offset_range,
                 state.r_cur, class_sizes_text(state.class_history[-1] if state.class_history else None))

    # rank 0 writes this iteration's outputs while every rank computes the next one; the previous iteration's
    # writing must have succeeded (a failure there stops every rank here, cleanly)
    def hand_over():  # rank 0; its failure (the previous files, or starting the writer) stops every rank
        writer.wait()
        if it == first_written + 1:  # the first iteration's files are written: will the rest fit the disk?
            warning = disk_outlook(job.args.output, first_written, job.args.iter)
            if warning:
                log.warning("%s", warning)
        # the figures in a writer of their own, beside the data files and the checkpoint (at box 128 the files of an
        # iteration took longer than the next iteration on an H100: the job waited for them)
        snap, out = state.snapshot(), job.args.output
        writer.submit_all([(write_iteration, (out, it, job.mode, job.star, particles, snap, info, job.meta),
                            {"figures": False}),
                           (write_figures, (out, it, job.mode, snap, info, job.meta), {})])

    root_step(comm, hand_over)
