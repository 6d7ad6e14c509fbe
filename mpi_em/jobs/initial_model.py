"""`initial-model`: an ab-initio 3D model from particles alone (no reference), on the EM engine.

Mini-batch (stochastic) expectation-maximisation, after RELION 3's SGD initial model and cryoSPARC's ab initio:

1. start: the reconstruction of a random subset of particles at random poses (seeded, uniformly random
   rotations), limited to ``--ini-high``: a featureless blob of the right scale (``--start MRC``: a given map
   low-passed to ``--ini-high`` instead, e.g. the truth, to check that the iterations keep a known structure);
2. iterations 1..N: a random mini-batch of ``--batch-size`` particles (drawn from ``--seed`` and the iteration:
   every rank derives the same rows without communication and keeps its own; ``--batch-size-ini`` B0: B0
   particles at iteration 1, growing over the resolution ramp below to ``--batch-size``, as RELION's SGD),
   E-step with a global search at ``--healpix-order`` (default 0; translations within ``--offset-range``) at a
   resolution limit that rises linearly from ``--ini-high`` to ``--final-high`` Å over the first three quarters
   of the iterations, with the noise spectrum multiplied by a factor (``--sigma2-fudge``, a temperature) that falls to 1
   over the same ramp;
   the model update (``--model-update``): ``sums`` reconstructs the model from running sums of the mini-batches'
   back-projections, S <- d S + S_batch with d rising from ``--sums-decay`` D0 to D1 (about batch / (1 - d)
   particles' worth of data, the early poses forgotten); ``maps`` blends the mini-batch's map into the model,
   V <- (1 - w) V + w V_batch (``--update-weight``);
   K > 1: the first ``--consensus`` fraction of the iterations build one consensus map from all particles; then
   it is split into K classes (each with the consensus's sums over K; the split iteration's mini-batch in seeded
   random classes, as class3d's first iteration) that compete for the particles (measured: K random starts, or a
   split at half of the iterations, separate two conformations far less often: benchmarks/results/initial-model);
3. passes over all particles at the final resolution (``--final-passes``, default 3, each against the previous
   one's maps; a global search at ``--final-healpix-order``, default 1)
   give every particle's pose and class (``run_data.star``), the class sizes and the final maps
   (``run_classNNN.mrc``, the particles' box);
   ``--starts N`` (K = 1; default 3 from random starts with the final passes): steps 1-2 once per start, N
   starts, start s with seed ``--seed`` + s (each start as the job with that seed: from scratch, unknown poses,
   the images' noise spectrum); then each start's map makes one pass over all particles, all with the images' own
   noise spectrum (one yardstick for every map: each start's own noise model would make their likelihoods
   incomparable), and the start whose pass has the highest summed log-likelihood is kept: its pass is the first
   final pass (``run_startNNN.mrc``, and the table model_starts in ``run_model.star``). Several ``--start`` maps are
   compared the same way (``--iter 0``: without mini-batches);
4. ``--sym``: as RELION applies symmetry to an ab-initio map, only at the end: each C1 class map is put onto the
   point group's axes (:mod:`mpi_em.symaxis`, the search of ``relion_align_symmetry``), symmetrised there, and
   its particles' poses moved with it (:mod:`mpi_em.initial.point_group`).

``--continue DIR`` resumes after the last checkpointed iteration (mpi_em.initial.state; a checkpoint after the last
mini-batch, otherwise every ``--checkpoint-interval`` seconds): with the same seed, the same maps as an
uninterrupted run.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from ..backend import get_xp, synchronize, to_host
from ..distributed import agree, allreduce_sum, collective_step, log_placement, root_step, select_device
from ..em.engine import (SearchSpec, Stats, current_mats, expectation_batch, image_shifts_px,
                         inverse_sigma2_points, prepare_batch, shell_of_points, sigma2_from_images,
                         update_plan_poses)
from ..em.inputs import reference_mask
from ..em.model import reduce_and_reconstruct_3d
from ..em.outputs import gather_particles
from ..em.references import References, fine_offsets, global_grid, insert
from ..em.steps import check_finite_maps
from ..fourier import SliceGeometry, default_r_max, padded_reach
from ..initial import state as ckpt
from ..initial.setup import (DEFAULT_BATCH_SIZE, DEFAULT_CHECKPOINT_INTERVAL, DEFAULT_FINAL_HEALPIX_ORDER,
                             DEFAULT_FINAL_PASSES, DEFAULT_HEALPIX_ORDER, DEFAULT_ITER, DEFAULT_STARTS, checkpoint,
                             estep_plan, finished_starts, init, number_of_starts, options, reset_poses, split_at,
                             subplan, write_back)
from ..initial.outputs import read_starts, write_final, write_iteration, write_start
from ..initial.schedule import batch_size, minibatch_rows, noise_fudge, random_rotations, schedule, sums_decay
from ..io import rebase_image_names
from ..memory import add_argument as add_memory_argument, release_device_memory
from ..particles import RowCache, pinned_wanted
from ..sampling import angular_step, next_perturbation
from ..symmetry import symmetry_matrices
from . import add_job_folder_arguments, positive_int

log = logging.getLogger("mpi_em")
DESCRIPTION = ("Mini-batch expectation-maximisation from a random start (after RELION 3's SGD initial model): "
               "K classes from random-pose reconstructions of a random subset; each iteration a seeded random "
               "mini-batch, a global orientation and translation search, and the model reconstructed from running "
               "sums of the mini-batches (or their maps blended in), at a resolution limit that rises from "
               "--ini-high to --final-high while the noise temperature (--sigma2-fudge) falls to 1; then passes "
               "over all particles for their poses, classes and the final maps (run_classNNN.mrc at the particles' "
               "box, run_data.star, run_model.star, run_itNNN_slices.png). --sym puts each final map onto the point "
               "group's axes (a search as relion_align_symmetry's), symmetrises it there and moves its particles' "
               "poses with it. --continue DIR "
               "resumes from the last checkpoint (--checkpoint-interval).")


def add_arguments(p) -> None:
    add_job_folder_arguments(p, "its last checkpoint, written after the last mini-batch and otherwise every "
                                "--checkpoint-interval seconds")
    p.add_argument("--K", type=int, default=1, help="number of classes, each from its own random start (default 1)")
    p.add_argument("--sym", default="C1",
                   help="point group C<n>, D<n>, T, O, I applied to the final maps only (default C1): each C1 "
                        "map is rotated and centred onto the group's axes (searched), symmetrised, and its "
                        "particles' poses moved with it")
    p.add_argument("--iter", type=int, default=None,
                   help=f"number of mini-batch iterations of each start (default {DEFAULT_ITER}); 0, with --start: "
                        "none, the maps straight to the final passes")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"particles per mini-batch (default {DEFAULT_BATCH_SIZE}; all particles when there are "
                        "fewer); with "
                        "--batch-size-ini, the size the mini-batch grows to")
    p.add_argument("--batch-size-ini", type=int, default=None, metavar="B0",
                   help="a growing mini-batch (RELION's SGD: --sgd_ini_subset to --sgd_fin_subset): B0 particles "
                        "at the first iteration, rising linearly with the resolution limit to --batch-size at "
                        "three quarters of the iterations (where --final-high is reached), then --batch-size; "
                        "1 <= B0 <= --batch-size (default: none, every mini-batch --batch-size)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random start and of the mini-batches (same seed, same maps for any number "
                        "of ranks; default 0)")
    p.add_argument("--particle-diameter", type=float, default=None,
                   help="diameter of the soft spherical mask, Å (default: 80%% of the box)")
    p.add_argument("--ini-high", type=float, default=30.0,
                   help="resolution limit of the start and of the first iteration, Å (default 30)")
    p.add_argument("--final-high", type=float, default=15.0,
                   help="resolution limit of the last iterations and of the final pass, Å (default 15; never "
                        "finer than 2.5 pixels)")
    p.add_argument("--model-update", choices=["sums", "maps"], default="sums",
                   help="sums: the model is reconstructed from running sums of the mini-batches' back-projections "
                        "(--sums-decay); maps: each mini-batch's map is blended into the model (--update-weight). "
                        "Default sums")
    p.add_argument("--sums-decay", type=float, nargs=2, metavar=("D0", "D1"),
                   default=[0.5, 0.9],
                   help="--model-update sums: S <- d S + S_batch, d rising from D0 at the first iteration to D1 at "
                        "three quarters of them (default 0.5 0.9)")
    p.add_argument("--update-weight", type=float, default=0.5, metavar="W",
                   help="--model-update maps: V <- (1 - W) V + W V_batch (default 0.5; 1 = replace the model by "
                        "each mini-batch's map)")
    p.add_argument("--sigma2-fudge", type=float, default=4.0, metavar="F",
                   help="the noise spectrum is multiplied by F at the first iteration, falling geometrically to 1 "
                        "at three quarters of the iterations: flatter posteriors early (RELION's "
                        "--sgd_sigma2fudge_ini; default 4)")
    p.add_argument("--consensus", type=float, default=0.3, metavar="FRACTION",
                   help="K > 1: the first FRACTION of the iterations build one consensus map from all particles; "
                        "then it is split into K classes (each the consensus's sums over K, the split iteration's "
                        "mini-batch in seeded random classes, as class3d's first iteration) and the classes compete "
                        "(default 0.3; 0 = K random starts)")
    p.add_argument("--start-noise", type=float, default=0.0, metavar="A",
                   help="add seeded noise, low-passed at --ini-high, of A times the start's standard deviation to "
                        "the random start (a structured start instead of a blob; default 0)")
    p.add_argument("--starts", type=int, default=None, metavar="N",
                   help="K = 1: N random starts (seeds --seed, --seed + 1, ...), each taken through all the "
                        "mini-batch iterations in turn, as N jobs with those seeds would; then each start's map makes "
                        "one pass over all particles with one noise spectrum for all (the images' own), and the map "
                        "whose pass explains the particles best (the highest summed log-likelihood) goes on through "
                        "the other final passes; each start's map is kept (run_startNNN.mrc) and the comparison is "
                        "in run_model.star. N times the mini-batch iterations and N - 1 more passes. Default "
                        f"{DEFAULT_STARTS} for K = 1 from random starts (1 with K > 1, --start or --no-final-pass). "
                        "Measured on 20 000 box-64 particles at SNR 0.05 (64 seeds): one start reaches <= 20 Å for "
                        "33%% of the seeds and finds the structure (< 25 Å) for 50%%; the likeliest of three keeps a "
                        "<= 20 Å map for 54%% of the seed triples and a found one for 72%%, of four 59%% and 77%%, at "
                        "2.0-2.7x one start's time (benchmarks/results/initial-model/starts-order-0-h100-2026-12-07/)")
    p.add_argument("--start", default=None, metavar="MRC", nargs="+",
                   help="start from this map (the particles' box; low-passed to --ini-high; every class a copy) "
                        "instead of the random start: e.g. to check that the iterations keep a known structure. "
                        "Several maps (K = 1): one start each, compared as --starts compares its random ones; with "
                        "--iter 0 the maps go straight to that comparison and the final passes")
    p.add_argument("--healpix-order", type=int, default=DEFAULT_HEALPIX_ORDER,
                   help="HEALPix order of the mini-batches' global search (0 = 60°, 1 = 30°, 2 = 15°; the fine pass "
                        f"oversamples it once; default {DEFAULT_HEALPIX_ORDER}: on 20 000 box-64 particles at SNR 0.05 "
                        "the structure was found for 34 of 64 seeds at order 0 with the final passes at 1, for 20 of "
                        "the same 64 at order 1, for 0 of 8 at order 2; benchmarks/results/initial-model/)")
    p.add_argument("--final-healpix-order", type=int, default=None, metavar="ORDER",
                   help="HEALPix order of the global search of the passes over all particles (the final passes and "
                        f"--starts' comparison; default {DEFAULT_FINAL_HEALPIX_ORDER}, or --healpix-order where that "
                        "is finer)")
    p.add_argument("--offset-range", type=float, default=3.0,
                   help="translation search range around each particle's current offset, pixels (default 3)")
    p.add_argument("--offset-step", type=float, default=1.0,
                   help="fine translation step, pixels (the coarse pass uses twice it; default 1)")
    p.add_argument("--tau2-fudge", type=float, default=4.0,
                   help="regularisation T: weight of the data against the prior (default 4, as class3d)")
    p.add_argument("--no-final-pass", action="store_true",
                   help="skip the passes over all particles: the final maps are the last model and run_data.star "
                        "holds the poses of the last mini-batch each particle was in (zeros for the others)")
    p.add_argument("--final-passes", type=int, default=DEFAULT_FINAL_PASSES, metavar="N",
                   help="passes over all particles after the mini-batches, each against the previous one's maps "
                        f"(default {DEFAULT_FINAL_PASSES})")
    p.add_argument("--pad", type=int, default=2, help="Fourier padding of the references (default 2)")
    p.add_argument("--checkpoint-interval", type=float, default=DEFAULT_CHECKPOINT_INTERVAL, metavar="SECONDS",
                   help="write the checkpoint that --continue resumes from after a mini-batch once this many seconds "
                        "have passed since the last one, and after the last mini-batch (default "
                        f"{DEFAULT_CHECKPOINT_INTERVAL:g}; 0 = after every mini-batch). The maps do not depend on it; "
                        "a job stopped between checkpoints resumes from the last one")
    p.add_argument("--cache-images", choices=["auto", "on", "off"], default="auto",
                   help="keep each rank's particle images in its memory, read once, instead of reading every "
                        "mini-batch's from its stacks (auto: on GPU ranks whose images fit in a quarter of the free "
                        "GPU memory, and off where the memory model would not fit its limit otherwise; CPU ranks "
                        "read through the operating system's page cache). The maps do not depend on it")
    p.add_argument("--batch", type=positive_int, default=None,
                   help="particles per E-step batch, the unit of work of a rank, not the mini-batch (--batch-size) "
                        "(default: on GPU ranks 1024 x (128 / box)^2 between 64 and 1024, lowered where the memory "
                        "model says its workspace does not fit; 64 on CPU ranks). The maps do not depend on it "
                        "beyond float rounding")
    add_memory_argument(p)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"],
                   help="auto: one GPU per rank when CuPy sees one, else CPU")
    p.add_argument("--no-ctf", action="store_true", help="ignore the CTF")


def run(args, comm, after_iteration=None) -> dict:
    """The job. ``after_iteration(it)`` is called on every rank after each finished mini-batch iteration; True
    stops the run there, after that iteration's checkpoint, as a job killed after it (tests of --continue;
    subprocess tests set ``MPI_EM_STOP_AFTER_ITERATION``)."""
    from .. import config

    if after_iteration is None and config.stop_after_iteration():
        stop = config.stop_after_iteration()
        after_iteration = lambda it: it == stop  # noqa: E731
    t_start = time.time()
    loaded = collective_step(comm, options, args, comm)
    err, res = None, None
    if comm.rank == 0:
        try:
            res = init(args, comm.size, loaded)
        except Exception as e:  # noqa: BLE001 - agreed on by every rank
            err = e
    agree(comm, err)
    plans, meta, star = res if comm.rank == 0 else (None, None, None)
    meta = comm.bcast(meta, root=0)
    plan = comm.scatter(plans, root=0)
    star_rank0 = (star.optics, rebase_image_names(star, args.output)) if comm.rank == 0 else None
    device = collective_step(comm, select_device, comm, args.device)
    xp = get_xp(device)
    log_placement(comm, device, log)
    box, apix, K, n = meta["box"], meta["pixel_size"], meta["K"], meta["n"]
    n_starts = number_of_starts(args)
    n_total = n_starts * args.iter  # the mini-batch iterations of all starts, one start after the other
    n_shells = box // 2 + 1
    pad = args.pad
    mask = reference_mask(box, apix, args, 3, xp)
    r_top = default_r_max(box)
    final_high = max(args.final_high, 2.5 * apix)
    r_of = lambda res_A: float(min(r_top, max(3.0, box * apix / res_A)))  # noqa: E731
    b0 = getattr(args, "batch_size_ini", None)  # None: a fixed mini-batch (and in checkpoints older than it)
    if comm.rank == 0:
        sizes = (f"{min(b0, n)} -> {min(args.batch_size, n)}" if b0 is not None and b0 != args.batch_size
                 else f"{min(args.batch_size, n)}")
        log.info("initial-model: %d particles, box %d, %.3f Å/px, K=%d, %s%d iterations of %s particles, %.1f -> "
                 "%.1f Å, model update %s, %d rank(s); rank 0 on %s", n, box, apix, K,
                 f"{n_starts} starts of " if n_starts > 1 else "", args.iter, sizes, args.ini_high, final_high,
                 args.model_update, comm.size, device)
    # the E-step's batch (GPU ranks: ~1024 box-128 images; CPU ranks: 64) after the memory model's check, before
    # anything large is allocated (exit 2 naming what would fit where even the lightest choice would not)
    e_batch, grid_chunk, cache = estep_plan(comm, args, meta, device, xp, r_of(final_high), len(plan["index"]), log)
    images = RowCache(xp, cache, plan)  # GPU ranks: the images read once, the mini-batches gathered from memory
    pinned = pinned_wanted(xp)
    sym_ops = symmetry_matrices(args.sym) if symmetry_matrices(args.sym).shape[0] > 1 else None
    vol_shape = SliceGeometry(box, pad=pad, xp=xp).vol_shape

    def reconstruct(F_acc, W_acc, r_cur):
        maps, _ = reduce_and_reconstruct_3d(comm, F_acc, W_acc, box, pad, r_cur, args.tau2_fudge, False)
        return to_host(maps).astype(np.float64)

    st = {"iter": 0, "offset_sigma": args.offset_range / 2.0, "perturb": 0.0, "r_acc": 0.0}
    F_run = W_run = None
    candidates = []  # the maps (float32, as the E-step projects them) of the starts finished before the current one
    start_maps = meta.pop("start_maps", None)
    k_start = K if split_at(args) <= 1 else 1
    seed_of = lambda s: int(args.seed) + s  # noqa: E731 - start s draws what a job with this seed draws

    def random_start(seed):
        """The reconstruction of ``--batch-size`` particles drawn with ``seed`` at random poses drawn with it."""
        start_rows = minibatch_rows(n, args.batch_size, seed, 0)
        rots = random_rotations(n, seed)
        r0 = r_of(args.ini_high)
        geom = SliceGeometry(box, r_max=r0, pad=pad, xp=xp)
        inv_s2 = inverse_sigma2_points(sigma2_data, shell_of_points(geom), xp)
        F_acc = xp.zeros((k_start,) + geom.vol_shape, dtype=xp.complex128)
        W_acc = xp.zeros((k_start,) + geom.vol_shape, dtype=xp.float64)
        sub = subplan(plan, np.isin(plan["row"], start_rows))
        for sl, imgs in images.batches(sub, e_batch, pinned=pinned):
            X, ctf = prepare_batch(imgs, sub, sl, geom, box, apix, use_ctf=not args.no_ctf)
            if ctf is None:
                ctf = xp.ones(X.shape, dtype=xp.float32)
            wts = (ctf * inv_s2[None, :]).astype(xp.float32)
            insert(F_acc, W_acc, 3, xp.asarray(rots[sub["row"][sl]]),
                   xp.asarray(sub["class_number"][sl] - 1), X * wts, ctf * wts, geom)
        synchronize(xp)
        return F_acc, W_acc

    def start_model(s):
        """Start s's first model: the random start of its seed, or the s-th --start map low-passed to --ini-high;
        with --start-noise, seeded low-passed noise on it (the same on every rank)."""
        from ..em.model import lowpass

        seed = seed_of(s)
        if start_maps is None:
            m = reconstruct(*collective_step(comm, random_start, seed), r_of(args.ini_high))
        else:
            m = np.repeat(lowpass(start_maps[s][None].astype(np.float64), box, apix, args.ini_high), k_start, 0)
        if args.start_noise > 0:
            noise = lowpass(np.random.default_rng([seed, 17]).standard_normal(m.shape), box, apix, args.ini_high)
            m = m + args.start_noise * noise * (m.std() / max(noise.std(), 1e-30))
        check_finite_maps(m, 0)
        return m

    if loaded is not None:  # --continue: the state of the last finished iteration
        _, scal, arrays, _ = loaded if comm.rank == 0 else (None, None, None, None)
        names = ("model", "sigma2", "class_prior", "history", "resolutions", "sigma2_data")
        scal, small = comm.bcast((scal, {k: arrays[k] for k in names if k in arrays}) if comm.rank == 0 else None,
                                 root=0)
        st.update(scal)
        model, sigma2, class_prior = small["model"], small["sigma2"], small["class_prior"]
        history, resolutions = small["history"].tolist(), small["resolutions"].tolist()
        sigma2_data = small.get("sigma2_data")  # absent in checkpoints older than --starts (one start)
        # the starts finished before the checkpoint's iteration: their maps, written when each one finished
        n_done = finished_starts(st["iter"], args.iter) if n_starts > 1 else 0
        candidates = list(root_step(comm, read_starts, args.output, n_done, box)) if n_done else []
        if comm.bcast(comm.rank == 0 and "F_run" in arrays, root=0):
            idx = ckpt.ball_indices(pad * box, padded_reach(st["r_acc"], pad))
            shape = (model.shape[0],) + vol_shape
            F_run = ckpt.scatter_ball(arrays["F_run"] if comm.rank == 0 else None, idx, shape, xp.complex128, xp,
                                      comm.rank)
            W_run = ckpt.scatter_ball(arrays["W_run"] if comm.rank == 0 else None, idx, shape, xp.float64, xp,
                                      comm.rank)
        del arrays
        if comm.rank == 0:
            log.info("--continue: resuming after iteration %d of %d", st["iter"], n_total)
    else:
        # ---- noise spectrum from every image, and the random start (random poses and classes of a random subset)
        def first_pass():
            geom = SliceGeometry(box, pad=pad, xp=xp)
            sh = shell_of_points(geom)
            s_sum, s_cnt = np.zeros(n_shells), np.zeros(n_shells)
            for sl, imgs in images.batches(plan, e_batch, pinned=pinned):
                X, _ = prepare_batch(imgs, plan, sl, geom, box, apix, use_ctf=False)
                a, b = sigma2_from_images(X, sh, n_shells)
                s_sum += a
                s_cnt += b
            return s_sum, s_cnt

        s_sum, s_cnt = collective_step(comm, first_pass)
        tot = np.concatenate([s_sum, s_cnt])
        allreduce_sum(comm, tot)
        # the images' own power spectrum: the first noise model of every start and the one the starts are
        # compared with
        sigma2_data = np.where(tot[n_shells:] > 0, tot[:n_shells] / np.maximum(tot[n_shells:], 1), 1.0)
        sigma2 = sigma2_data.copy()
        model = start_model(0)
        class_prior = np.full(k_start, 1.0 / k_start)
        history, resolutions = [], []

    def e_step(sub, r_cur, fudge=1.0, fixed_class=False, order=None):
        """E-step over the rank's rows of ``sub`` against the current model, a global search at HEALPix ``order``
        -> accumulators, stats."""
        k_now = model.shape[0]
        geom = SliceGeometry(box, r_max=r_cur, pad=pad, xp=xp)
        shells = shell_of_points(geom)
        inv_s2 = inverse_sigma2_points(sigma2 * fudge, shells, xp)
        refs = References(xp.asarray(model.astype(np.float32)), 3, pad, mask=mask, reach=padded_reach(r_cur, pad))
        order = args.healpix_order if order is None else order
        step = angular_step(order)
        spec = SearchSpec(dim=3, n_classes=k_now, fixed_class=fixed_class,
                          global_mats=global_grid(3, order, "C1", xp, perturb_deg=st["perturb"] * step),
                          local_mats=None, fine_mats=fine_offsets(3, step, xp), offset_range=args.offset_range,
                          offset_step=args.offset_step, offset_sigma=st["offset_sigma"],
                          offset_perturb=st["perturb"] * args.offset_step, n_select=4, class_select=10,
                          grid_chunk=grid_chunk,
                          log_class_prior=xp.asarray(np.log(np.maximum(class_prior, 1e-10)), dtype=xp.float32))

        def work():
            F_acc = xp.zeros((k_now,) + geom.vol_shape, dtype=xp.complex128)
            W_acc = xp.zeros((k_now,) + geom.vol_shape, dtype=xp.float64)
            stats = Stats.zeros(n_shells, k_now)
            for sl, imgs in images.batches(sub, e_batch, pinned=pinned):
                X, ctf = prepare_batch(imgs, sub, sl, geom, box, apix, use_ctf=not args.no_ctf)
                res = expectation_batch(X, ctf, inv_s2, shells, refs, xp.zeros(sl.stop - sl.start, dtype=xp.int64),
                                        current_mats(sub, sl, 3, xp), xp.asarray(sub["class_number"][sl] - 1),
                                        spec, geom, F_acc, W_acc, stats, n_shells,
                                        prior_offsets=image_shifts_px(sub, sl, apix))
                update_plan_poses(sub, sl, res, 3, apix)
            synchronize(xp)
            return F_acc, W_acc, stats

        F_acc, W_acc, stats = collective_step(comm, work)
        vec = stats.as_vector()
        allreduce_sum(comm, vec)
        return F_acc, W_acc, Stats.from_vector(vec, n_shells, k_now)

    def update_model_stats(stats):
        nonlocal sigma2, class_prior
        cnt = stats.sigma2_count
        sigma2 = np.where(cnt > 0, stats.sigma2_sum / np.maximum(cnt, 1), sigma2)
        if stats.class_weight.sum() > 0:
            class_prior = stats.class_weight / stats.class_weight.sum()
        if stats.offset_w > 0:
            st["offset_sigma"] = float(np.clip(np.sqrt(stats.offset_sq / (2 * stats.offset_w)), args.offset_step,
                                               args.offset_range))

    def finish_start(m):
        """The current start's map (after its mini-batches) is done: kept for the comparison, and written
        (run_startNNN.mrc: the checkpoints refer to these files)."""
        candidates.append(np.asarray(m, dtype=np.float32))
        root_step(comm, write_start, args.output, len(candidates) - 1, candidates[-1], apix)

    def begin_start(s):
        """Start s (> 0) from scratch, as a job with its seed: its first model, the images' noise spectrum, no
        running sums, every particle's pose unknown."""
        nonlocal model, sigma2, class_prior, F_run, W_run
        reset_poses(plan)  # first: the random start inserts the images at their current offsets
        model = start_model(s)
        sigma2 = sigma2_data.copy()
        class_prior = np.full(k_start, 1.0 / k_start)
        F_run = W_run = None
        # GPU ranks: the pool's unused blocks, of the last start's growing resolutions, given back so that each
        # start allocates as the first did (with the running sums dropped before the passes: the three-start job's
        # peak 0.15-0.2 GiB lower at box 128; benchmarks/results/initial-model/starts-memory-and-k3-h100-2026-12-07/)
        release_device_memory(xp)
        st.update(offset_sigma=args.offset_range / 2.0, perturb=0.0, r_acc=0.0)

    stopped = False
    interval = float(getattr(args, "checkpoint_interval", 0.0))  # 0: checkpoints older than the option
    t_ckpt = time.time()
    for it in range(st["iter"] + 1, n_total + 1):
        t_it = time.time()
        s_i, j = divmod(it - 1, args.iter)  # start s_i's iteration j
        j += 1
        seed = seed_of(s_i)
        if j == 1 and s_i > 0:
            finish_start(model[0])
            begin_start(s_i)
        if j == 1 and n_starts > 1 and comm.rank == 0:
            log.info("start %d of %d (seed %d)", s_i + 1, n_starts, seed)
        res_A = max(schedule(j, args.iter, args.ini_high, final_high), final_high)
        r_cur = r_of(res_A)
        st["perturb"] = next_perturbation(st["perturb"], 0.5, seed, j)
        rows = minibatch_rows(n, batch_size(j, args.iter, b0, args.batch_size), seed, j)
        keep = np.isin(plan["row"], rows)
        split = j == split_at(args) and j > 1
        if split:  # the consensus into K classes; every particle into its seeded random class
            model = np.repeat(model, K, axis=0)
            class_prior = np.full(K, 1.0 / K)
            plan["class_number"] = np.random.default_rng([int(args.seed), 13]).integers(1, K + 1, n)[plan["row"]]
            if F_run is not None:
                F_run, W_run = xp.repeat(F_run / K, K, axis=0), xp.repeat(W_run / K, K, axis=0)
            if comm.rank == 0:
                log.info("iteration %d: the consensus split into %d classes", it, K)
        sub = subplan(plan, keep)
        F_b, W_b, stats = e_step(sub, r_cur, noise_fudge(j, args.iter, args.sigma2_fudge), split)
        write_back(plan, sub, keep)
        if args.model_update == "sums":
            if F_run is None:
                F_run, W_run = F_b, W_b
            else:
                d = sums_decay(j, args.iter, *args.sums_decay)
                F_run *= d
                F_run += F_b
                W_run *= d
                W_run += W_b
            del F_b, W_b
            st["r_acc"] = max(st["r_acc"], r_cur)
            model = reconstruct(F_run.copy(), W_run.copy(), r_cur)
        else:
            w = args.update_weight
            maps = reconstruct(F_b, W_b, r_cur)
            model = maps if j == 1 else (1.0 - w) * model + w * maps
        check_finite_maps(model, it)
        update_model_stats(stats)
        history.append([float(x) for x in class_prior] + [0.0] * (K - len(class_prior)))  # consensus: class 1
        resolutions.append(res_A)
        st["iter"] = it
        # a checkpoint after the last mini-batch, after one that stops the job (tests), and otherwise once
        # --checkpoint-interval seconds have passed since the last (rank 0's clock, the same choice on every rank)
        halt = after_iteration is not None and after_iteration(it)
        due = comm.bcast(it == n_total or halt or time.time() - t_ckpt >= interval if comm.rank == 0 else None,
                         root=0)
        if comm.rank == 0:
            log.info("iteration %d: %d particles at %.1f Å (r %.0f px), log-likelihood %.4g, class sizes %s, "
                     "%.2f s%s", it, len(rows), res_A, r_cur, stats.loglike,
                     " ".join(f"{x:.2f}" for x in class_prior), time.time() - t_it, "; checkpoint" if due else "")
        if due:
            checkpoint(comm, args, meta, st, plan, model, sigma2, class_prior, history, resolutions, F_run, W_run,
                       sigma2_data)
            t_ckpt = time.time()
        root_step(comm, write_iteration, args.output, it, model, apix, class_prior, res_A)
        if halt:
            stopped = True
            break

    if stopped:
        return {"mode": "initial-model", "iterations": st["iter"], "stopped": True, "ranks": comm.size,
                "seconds": time.time() - t_start}
    # the running sums are not used after the mini-batches (a --continue resumes from the checkpoint written after
    # the last one): given back before the passes over all particles, whose E-step is the job's largest
    F_run = W_run = None
    release_device_memory(xp)

    def compare_starts(maps):
        """One pass over all particles for each start's map, every one with the images' noise spectrum and from
        unknown poses; the start whose pass has the highest summed log-likelihood is kept: its pass's map,
        poses and noise model go on. -> (its map (1, ...), the starts' table for run_model.star)."""
        nonlocal model, sigma2, class_prior
        t_c = time.time()
        r_cur = r_of(final_high)
        everyone = np.ones(len(plan["row"]), dtype=bool)
        lls, best = [], None
        for c, m in enumerate(maps):
            model = m[None].astype(np.float64)
            sigma2, class_prior = sigma2_data.copy(), np.ones(1)
            st["offset_sigma"] = args.offset_range / 2.0
            reset_poses(plan)
            full = subplan(plan, everyone)
            F_b, W_b, stats = e_step(full, r_cur, order=final_order)
            lls.append(float(stats.loglike))  # summed over the ranks' particles: the same on every rank
            better = comm.bcast(best is None or lls[-1] > lls[best[0]] if comm.rank == 0 else None, root=0)
            if better:
                best = (c, reconstruct(F_b, W_b, r_cur), full, stats)
            del F_b, W_b
            if comm.rank == 0:
                log.info("start %d of %d: a pass over all %d particles at %.1f Å, summed log-likelihood %.1f",
                         c + 1, len(maps), n, final_high, lls[-1])
        c, best_map, full, stats = best
        write_back(plan, full, everyone)
        sigma2 = sigma2_data.copy()
        update_model_stats(stats)
        if comm.rank == 0:
            log.info("start %d kept (the highest log-likelihood; %s): final pass 1 of %d, %.1f s", c + 1,
                     " ".join(f"{x - lls[c]:+.0f}" for x in lls), n_final, time.time() - t_c)
        table = {"seeds": [seed_of(s) for s in range(len(maps))], "loglike": lls, "chosen": c}
        check_finite_maps(best_map, args.iter + 1)
        return best_map, table

    n_final = 0 if args.no_final_pass else args.final_passes
    final_order = args.final_healpix_order  # the passes' search (resolved by initial.setup.options)
    first_pass_done = 0
    starts_table = None
    if n_starts > 1:
        if args.iter == 0:  # the given maps, as they are (low-passed to --ini-high)
            for s in range(n_starts):
                finish_start(start_model(s)[0])
        else:
            finish_start(model[0])
        model, starts_table = compare_starts(candidates)
        first_pass_done = 1
    for p_i in range(first_pass_done, n_final):  # passes over all particles (C1; --sym after them)
        t_f = time.time()
        r_cur = r_of(final_high)
        everyone = np.ones(len(plan["row"]), dtype=bool)
        full = subplan(plan, everyone)
        F_b, W_b, stats = e_step(full, r_cur, order=final_order)
        model = reconstruct(F_b, W_b, r_cur)
        del F_b, W_b
        write_back(plan, full, everyone)
        check_finite_maps(model, args.iter + 1 + p_i)
        update_model_stats(stats)
        if comm.rank == 0:
            log.info("final pass %d of %d over all %d particles at %.1f Å, HEALPix order %d: %.1f s", p_i + 1,
                     n_final, n, final_high, final_order, time.time() - t_f)
    if args.no_final_pass and sym_ops is not None and comm.rank == 0:
        log.warning("warning: --sym %s is applied by the final pass only; with --no-final-pass the maps are C1",
                    args.sym)
    counts = np.bincount(plan["class_number"] - 1, minlength=K).astype(np.float64)
    allreduce_sum(comm, counts)
    particles = gather_particles(comm, plan)
    if sym_ops is not None and n_final:
        model = root_step(comm, _onto_point_group, model, particles, args.sym, apix)
    root_step(comm, write_final, args.output, star_rank0, particles, model, apix, counts, class_prior,
              np.asarray(history), starts_table)
    summary = {"mode": "initial-model", "iterations": n_total, "counts": counts.tolist(),
               "class_prior": class_prior.tolist(), "seconds": time.time() - t_start, "ranks": comm.size,
               "stopped": False}
    if comm.rank == 0:
        log.info("initial-model finished: %d iterations in %.1f s; particles per class %s", n_total,
                 summary["seconds"], " ".join(str(int(c)) for c in counts))
    return summary


def _onto_point_group(model, particles, group, apix):
    from ..initial.point_group import to_point_group

    return to_point_group(model, particles, group, apix)[0]


__all__ = ["add_arguments", "run", "schedule", "minibatch_rows", "random_rotations"]
