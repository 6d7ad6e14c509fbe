"""initial-model's set-up and checkpoints: the options of a new or continued run, the inputs read and the
particles' plans (rank 0), the per-iteration checkpoint."""
from __future__ import annotations

import os
from dataclasses import replace

import numpy as np

from ..distributed import make_plan, root_step
from ..em.outputs import gather_particles
from ..errors import InputError, MpiEmError
from ..fourier import padded_reach
from ..io import check_stacks, check_writable_dir, read_map, read_particles
from ..io.sanity import check_box, check_same_input, input_record, warn_absurd_values
from ..jobs import restore_options
from ..symmetry import symmetry_matrices
from . import state as ckpt


def subplan(plan, keep):
    return {k: (v[keep] if isinstance(v, np.ndarray) and v.shape[:1] == plan["row"].shape else v)
            for k, v in plan.items()}


def write_back(plan, sub, keep):
    for k in ckpt.PER_PARTICLE:
        plan[k][keep] = sub[k]


def reset_poses(plan):
    """Every particle of the plan back to an unknown pose (a new start; K = 1: class 1)."""
    for k in ckpt.PER_PARTICLE:
        plan[k][...] = 1 if k == "class_number" else 0


#: the default schedule, 150 mini-batches of 350 particles: on the box-32 test sets it found every single-class
#: structure at SNR 0.5-5 (9 of 9 jobs; 40 x 400 found 4) and separated K = 2 in 31 of 32 seeds (40 x 400: 30); on
#: 20 000 box-64 particles at SNR 0.05 (one H200) 21.9 Å against 30.9 Å (benchmarks/results/initial-model/)
DEFAULT_ITER = 150
DEFAULT_BATCH_SIZE = 350
#: passes over all particles after the mini-batches, each against the previous one's maps: on the issue's 20 000
#: box-64 particles at SNR 0.05 (CPU) the maps the mini-batches found end 0.8-1.8 Å finer after 3 passes than after
#: 1 (21.8 -> 20.0, 19.9 -> 19.1, 20.9 -> 19.9 Å), 5 passes add 0.2 Å more (benchmarks/results/initial-model/)
DEFAULT_FINAL_PASSES = 3
#: the mini-batches' global search at HEALPix order 0 (60°, oversampled once to 30°) and the passes over all
#: particles at order 1: on 20 000 box-64 particles of the compact phantom at SNR 0.05 the structure was found (FSC
#: 0.5 vs the truth < 25 Å) for 34 of 64 seeds against 20 of the same 64 with order 1 throughout (paired, McNemar
#: p = 0.024), as finely (mean of the found 20.1 against 20.2 Å); on the box-32 test sets no worse
#: (benchmarks/results/initial-model/)
DEFAULT_HEALPIX_ORDER = 0
DEFAULT_FINAL_HEALPIX_ORDER = 1
#: seconds between checkpoints of the mini-batches (and one after the last): on one GPU a box-128 mini-batch takes
#: ~0.15 s, of which writing the checkpoint of 100 000 particles took ~0.05 s when it was written after each one
#: (benchmarks/results/initial-model/)
DEFAULT_CHECKPOINT_INTERVAL = 60.0
#: random starts of a one-class job (K = 1, no --start maps, the final passes on), the likeliest kept: on 20 000
#: box-64 particles of the compact phantom at SNR 0.05 (64 seeds, one H100) one start reached <= 20 Å for 21 of 64
#: seeds (33%) and found the structure (< 25 Å) for 32 (50%); the likeliest of three kept a <= 20 Å map for 54% of
#: the seed triples and a found one for 72% (of the triples --starts 3 forms, seeds s, s + 1, s + 2: 37 and 44 of
#: 60), at 2.0-2.7x one start's time (the whole job on 100 000 box-128 particles on one H100: 35.5-37.4 against
#: 17.2-18.8 s, 51.8 against 19.1 s on another)
#: (benchmarks/results/initial-model/starts-order-0-h100-2026-12-07/)
DEFAULT_STARTS = 3
#: the finest HEALPix order of initial-model's global searches (order 4: 3 072 directions x 96 in-plane angles)
MAX_GLOBAL_ORDER = 4


def options(args, comm):
    """--continue: the run's options from its checkpoint (a new --iter replaces the number of iterations, except in
    a job of several starts) and its state; a new run: none. Every rank gets them. Either way the passes' HEALPix
    order is resolved here (``args.final_healpix_order``)."""
    if not args.continue_dir:
        if not args.input or not args.output:
            raise MpiEmError("initial-model needs --i STAR and --o DIR (or --continue DIR)")
        args.input = os.path.abspath(args.input)
        args.iter = DEFAULT_ITER if args.iter is None else args.iter
        if getattr(args, "starts", 1) is None:
            args.starts = default_starts(args)
        if getattr(args, "final_healpix_order", None) is None:  # never coarser than the mini-batches' search
            args.final_healpix_order = max(DEFAULT_FINAL_HEALPIX_ORDER, args.healpix_order)
        return None
    new_iter, cont = args.iter, args.continue_dir
    loaded = root_step(comm, ckpt.load, cont)
    restore_options(args, loaded[0]["args"])
    if getattr(args, "starts", None) is None:  # a checkpoint older than --starts: one start
        args.starts = 1
    if getattr(args, "final_healpix_order", None) is None:  # a checkpoint older than --final-healpix-order
        args.final_healpix_order = args.healpix_order
    args.continue_dir = args.output = cont
    args._expected_input = loaded[0].get("input")
    if new_iter is not None:
        if new_iter != args.iter and number_of_starts(args) > 1:
            raise MpiEmError(f"{cont}: a job of {number_of_starts(args)} starts continues with its own --iter "
                             f"({args.iter} per start), not {new_iter}: each start's iterations would be others")
        args.iter = new_iter
    return loaded


def default_starts(args) -> int:
    """--starts when not given: DEFAULT_STARTS for one class from random starts with the final passes (where
    the starts are compared), else 1 (K > 1, --start maps, --no-final-pass)."""
    if args.K == 1 and not getattr(args, "start", None) and not getattr(args, "no_final_pass", False):
        return DEFAULT_STARTS
    return 1


def split_at(args) -> int:
    """The first iteration with K classes (1: K random starts; K = 1: never split)."""
    if args.K == 1:
        return 0
    return 1 + int(round(args.consensus * args.iter))


def init(args, size, loaded):
    check_writable_dir(args.output)
    star = read_particles(args.input)
    record = input_record(star)
    if getattr(args, "_expected_input", None):
        check_same_input(record, args._expected_input, args.continue_dir)
    check_box(star)
    check_stacks(star)
    warn_absurd_values(star)
    box, apix = int(star.box[0]), float(star.pixel_size[0])
    if args.K < 1 or args.K > star.n:
        raise MpiEmError(f"--K must be between 1 and the number of particles ({star.n}), got {args.K}")
    if args.batch_size < 1 or args.iter < 0:
        raise MpiEmError(f"--batch-size must be >= 1 and --iter >= 0, got {args.batch_size} and {args.iter}")
    n_starts = number_of_starts(args)
    if getattr(args, "starts", 1) < 1:
        raise MpiEmError(f"--starts must be >= 1, got {args.starts}")
    if args.start and getattr(args, "starts", 1) > 1:
        raise MpiEmError("--starts N makes N random starts and --start gives the starts: use one of them")
    if n_starts > 1 and args.K > 1:
        raise MpiEmError(f"{n_starts} starts need --K 1 (the starts are compared for one map), got --K {args.K}")
    if n_starts > 1 and args.no_final_pass:
        raise MpiEmError(f"{n_starts} starts are compared in the first final pass: --no-final-pass leaves none")
    if args.iter == 0 and (not args.start or args.K > 1 or args.no_final_pass):
        raise MpiEmError("--iter 0 (no mini-batches) takes the --start map(s) straight to the final passes: it "
                         "needs --start, --K 1 and the final passes")
    b0 = getattr(args, "batch_size_ini", None)
    if b0 is not None and not 1 <= b0 <= args.batch_size:
        raise MpiEmError(f"--batch-size-ini must be between 1 and --batch-size ({args.batch_size}), got {b0}")
    if not 0.0 < args.update_weight <= 1.0:
        raise MpiEmError(f"--update-weight must be in (0, 1], got {args.update_weight}")
    if not all(0.0 <= d < 1.0 for d in args.sums_decay):
        raise MpiEmError(f"--sums-decay values must be in [0, 1), got {args.sums_decay}")
    if getattr(args, "final_passes", 1) < 1:
        raise MpiEmError(f"--final-passes must be >= 1, got {args.final_passes}")
    if not 0.0 <= args.consensus < 1.0:
        raise MpiEmError(f"--consensus must be in [0, 1), got {args.consensus}")
    if args.sigma2_fudge < 1.0:
        raise MpiEmError(f"--sigma2-fudge must be >= 1, got {args.sigma2_fudge}")
    if not args.ini_high >= args.final_high > 0:
        raise MpiEmError(f"--ini-high ({args.ini_high} Å) must be >= --final-high ({args.final_high} Å) > 0")
    for name, order in (("--healpix-order", args.healpix_order),
                        ("--final-healpix-order", args.final_healpix_order)):
        if not 0 <= order <= MAX_GLOBAL_ORDER:
            raise MpiEmError(f"{name} must be between 0 and {MAX_GLOBAL_ORDER} (a global search over every direction; "
                             f"order 0 = 60°, {MAX_GLOBAL_ORDER} = {60 / 2 ** MAX_GLOBAL_ORDER:g}°), got {order}")
    symmetry_matrices(args.sym)
    if loaded is not None and n_starts > 1:  # the finished starts' maps the checkpoint refers to
        from .outputs import start_paths

        start_paths(args.output, finished_starts(loaded[1]["iter"], args.iter))
    plans = make_plan(star, size, seed=args.seed)
    first_class = np.random.default_rng([int(args.seed), 13]).integers(1, args.K + 1, star.n)
    saved = loaded[3] if loaded is not None else None
    for p in plans:
        k = len(p["row"])
        # no reference: every pose starts unknown (the STAR file's angles and origins are not used)
        for f in ("rot", "tilt", "psi", "origin_x", "origin_y", "pmax", "loglike"):
            p[f] = np.zeros(k)
        p["nsig"] = np.zeros(k, dtype=np.int64)
        p["class_number"] = first_class[p["row"]] if split_at(args) <= 1 else np.ones(k, dtype=np.int64)
        p["half"] = np.ones(k, dtype=np.int64)
        if saved is not None:  # --continue: every particle as the last finished iteration left it
            for f in ckpt.PER_PARTICLE:
                p[f] = np.asarray(saved[f])[p["row"]].astype(p[f].dtype)
    meta = {"box": box, "pixel_size": apix, "n": star.n, "K": int(args.K), "record": record}
    if getattr(args, "start", None) and loaded is None:
        meta["start_maps"] = np.stack([_start_map(path, box) for path in args.start])
    return plans, meta, star


def finished_starts(it: int, n_iter: int) -> int:
    """Starts whose mini-batches were all done before iteration ``it`` of all starts began (their maps are files):
    0 until the first iteration of start 2."""
    return (it - 1) // n_iter if it > 0 and n_iter > 0 else 0


def number_of_starts(args) -> int:
    """The starts a job compares: the --start maps given, else --starts (1 in checkpoints older than it)."""
    start = getattr(args, "start", None)
    if isinstance(start, str):  # a checkpoint written when --start took one map
        start = [start]
    return len(start) if start else int(getattr(args, "starts", 1) or 1)


def _start_map(path, box: int) -> np.ndarray:
    """--start: the map, checked against the particles' box."""
    vol, _ = read_map(path)
    if vol.shape != (box,) * 3:
        raise InputError(path, f"map shape {vol.shape} does not match the particles' box {box}", field="nx")
    return vol


def checkpoint(comm, args, meta, st, plan, model, sigma2, class_prior, history, resolutions, F_run, W_run,
               sigma2_data):
    """Iteration st["iter"]'s state into its checkpoint (rank 0 writes; the running sums summed over ranks inside
    the ball the insertion reached), then the previous checkpoint removed. The images' noise spectrum, which every
    start begins with; the maps of the starts finished before the current one are their run_startNNN.mrc files."""
    arrays = {"model": model, "sigma2": sigma2, "class_prior": class_prior,
              "history": np.asarray(history, dtype=np.float64).reshape(-1, meta["K"]),
              "resolutions": np.asarray(resolutions, dtype=np.float64), "sigma2_data": sigma2_data}
    if F_run is not None:
        idx = ckpt.ball_indices(args.pad * meta["box"], padded_reach(st["r_acc"], args.pad))
        arrays["F_run"] = ckpt.gather_ball(comm, F_run, idx)
        arrays["W_run"] = ckpt.gather_ball(comm, W_run, idx)
    particles = gather_particles(comm, plan)
    options = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("func", "continue_dir")}

    def write():
        ckpt.save(args.output, st["iter"], dict(st), arrays, {k: particles[k] for k in ckpt.PER_PARTICLE},
                  options, meta["record"])

    root_step(comm, write if comm.rank == 0 else None)


def estep_plan(comm, args, meta, device, xp, r_max: float, n_local: int, log):
    """The E-step's batch and grid chunk (collective), from the memory model's check before anything large is
    allocated: ``--batch`` or its default for the box and device (:func:`mpi_em.memory.default_batch`: 1024 box-128
    images on GPU ranks, 64 on CPU ranks), lowered to the largest that fits where the default does not (then the
    global grid projected in chunks); a job that still would not fit stops here naming what would (exit 2). The
    model's search is the largest the job makes: the finer of the mini-batches' and the passes' HEALPix orders, at
    ``r_max`` (the final resolution's radius), with the largest number of classes. The cuFFT plans are kept
    between mini-batches where the model leaves them room (as the EM jobs keep them). The images are kept in the
    rank's memory (``--cache-images``: auto on GPU ranks whose ``n_local`` images fit in a quarter of the free
    memory, dropped first where the model does not fit). -> (batch, grid_chunk, cache the images)."""
    from types import SimpleNamespace

    from ..memory import check as memory_check
    from ..memory import default_batch, em_inputs, estimate, job_limit, keep_fft_plans
    from ..particles import cache_wanted

    kind = "cpu" if device == "cpu" else "gpu"
    batch_floor = None
    batch = getattr(args, "batch", None)
    if batch is None:  # the smallest rank's default: one batch on every rank, so that the check's collectives agree
        batch = min(comm.allgather(default_batch(meta["box"], kind)))
        batch_floor = min(batch, default_batch(meta["box"], "cpu"))
    search = SimpleNamespace(batch=batch, pad=args.pad, offset_range=args.offset_range,
                             offset_step=args.offset_step, local=False, sym="C1", n_select=4, class_select=10,
                             healpix_order=max(args.healpix_order, args.final_healpix_order))
    cache = getattr(args, "cache_images", "off")  # off: checkpoints older than the option
    wanted = cache_wanted(cache, xp, n_local, meta["box"])
    inputs = em_inputs(search, "class3d", meta, comm.size, device, cache_images=wanted)
    inputs = replace(inputs, r=float(r_max), running_sums=True)
    mem = memory_check(comm, inputs, getattr(args, "max_memory", None), log, args.output, adapt="off",
                       cache=cache, batch_floor=batch_floor, job="initial-model",
                       offers=("--batch", "--cache-images", "--pad")).inputs
    lighter = mem.batch < batch or bool(mem.grid_chunk)  # sized to the limit: no room left for the plans
    keep_fft_plans(xp, None if lighter else estimate(mem), job_limit(comm, mem, getattr(args, "max_memory", None)))
    if comm.rank == 0:
        log.info("E-step batch %d particles%s; the images %s", mem.batch,
                 f", the global grid projected {mem.grid_chunk} orientations at a time" if mem.grid_chunk else "",
                 "kept in memory" if mem.cache_images else "read from their stacks for each mini-batch")
    return int(mem.batch), int(mem.grid_chunk), bool(mem.cache_images)
