"""`initial-model`: an ab-initio 3D model from particles alone (no reference), on the EM engine.

A simple form of stochastic (mini-batch) expectation-maximisation, after RELION 3's SGD initial model:

1. start: each class is the reconstruction of a random subset of particles at random poses (seeded, uniformly
   random rotations and random classes), low-passed at ``--ini-high``: a featureless blob of the right scale;
2. iterations 1..N: a random mini-batch of ``--batch-size`` particles (drawn from ``--seed`` and the iteration:
   every rank derives the same rows without communication and keeps its own), E-step with a global search at
   ``--healpix-order`` (translations within ``--offset-range``) at a resolution limit that rises linearly from
   ``--ini-high`` to ``--final-high`` Å; the mini-batch's M-step map V_b (tau^2 prior from its power, as class3d)
   updates the model, V <- (1 - w) V + w V_b with w = ``--update-weight``;
3. a last pass over all particles at the final resolution gives every particle's pose and class
   (``run_data.star``), the class sizes and the final maps (``run_classNNN.mrc``, the particles' box);
4. ``--sym``: the last pass's summed accumulators are symmetrised with the point group (RELION's symmetrise).
   The C1 map is NOT aligned to the point group's axes first (no axis search in this version): the
   symmetrised map is right only where the C1 map's axes happen to lie on the group's.

Not done yet: K > 1 is run (classes from different random starts, soft assignments) but its separation of
conformations is not tested; no ``--continue``.
"""
from __future__ import annotations

import logging
import os
import time

import numpy as np

from ..backend import get_xp, synchronize, to_host
from ..distributed import agree, allreduce_sum, collective_step, log_placement, make_plan, root_step, select_device
from ..em.engine import (SearchSpec, Stats, current_mats, expectation_batch, image_shifts_px,
                         inverse_sigma2_points, prepare_batch, shell_of_points, sigma2_from_images,
                         update_plan_poses)
from ..em.model import reduce_and_reconstruct_3d
from ..em.references import References, fine_offsets, global_grid, insert
from ..errors import MpiEmError
from ..fourier import SliceGeometry, default_r_max
from ..symmetrise import symmetrise
from ..io import check_stacks, check_writable_dir, read_particles, rebase_image_names, write_map, write_particles
from ..io.sanity import check_box, warn_absurd_values
from ..particles import ImageCache, pinned_wanted
from ..sampling import angular_step, next_perturbation
from ..symmetry import symmetry_matrices
from ..em.inputs import reference_mask
from ..em.outputs import gather_particles
from ..em.steps import check_finite_maps

log = logging.getLogger("mpi_em")
DESCRIPTION = ("Mini-batch expectation-maximisation from a random start (RELION 3's SGD initial model, simple form): "
               "K classes from random-pose reconstructions of a random subset; each iteration a seeded random "
               "mini-batch, a global orientation and translation search and the mini-batch's map blended into the "
               "model, at a resolution limit that rises from --ini-high to --final-high; then one pass over all "
               "particles for their poses, classes and the final maps (run_classNNN.mrc at the particles' box, "
               "run_data.star, run_model.star, run_itNNN_slices.png). --sym symmetrises that pass's sums without "
               "aligning the map to the group's axes first (no symmetry-axis search yet).")
E_BATCH = 64  # particles per E-step batch


def add_arguments(p) -> None:
    p.add_argument("--i", dest="input", metavar="STAR", required=True, help="particles STAR file (RELION 3.1+)")
    p.add_argument("--o", dest="output", metavar="DIR", required=True, help="output folder (created)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in the --o folder (its files are removed first)")
    p.add_argument("--K", type=int, default=1, help="number of classes, each from its own random start (default 1)")
    p.add_argument("--sym", default="C1",
                   help="point group C<n>, D<n>, T, O, I applied to the final maps only (default C1). The C1 map "
                        "is not aligned to the group's axes first (no symmetry-axis search yet)")
    p.add_argument("--iter", type=int, default=40, help="number of mini-batch iterations (default 40)")
    p.add_argument("--batch-size", type=int, default=400,
                   help="particles per mini-batch (default 400; all particles when there are fewer)")
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
    p.add_argument("--update-weight", type=float, default=0.5, metavar="W",
                   help="each mini-batch map enters the model with weight W: V <- (1 - W) V + W V_batch "
                        "(default 0.5; 1 = replace the model by each mini-batch's map)")
    p.add_argument("--healpix-order", type=int, default=2,
                   help="HEALPix order of the global search (1 = 30°, 2 = 15°; the fine pass oversamples it once; "
                        "default 2)")
    p.add_argument("--offset-range", type=float, default=3.0,
                   help="translation search range around each particle's current offset, pixels (default 3)")
    p.add_argument("--offset-step", type=float, default=1.0,
                   help="fine translation step, pixels (the coarse pass uses twice it; default 1)")
    p.add_argument("--tau2-fudge", type=float, default=4.0,
                   help="regularisation T: weight of the data against the prior (default 4, as class3d)")
    p.add_argument("--no-final-pass", action="store_true",
                   help="skip the pass over all particles: the final maps are the last model and run_data.star "
                        "holds the poses of the last mini-batch each particle was in (zeros for the others)")
    p.add_argument("--pad", type=int, default=2, help="Fourier padding of the references (default 2)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"],
                   help="auto: one GPU per rank when CuPy sees one, else CPU")
    p.add_argument("--no-ctf", action="store_true", help="ignore the CTF")


def schedule(it: int, n_iter: int, ini_high: float, final_high: float) -> float:
    """Resolution limit (Å) of iteration ``it`` (1..n_iter): linear in Å from ``ini_high`` to ``final_high``
    over the first three quarters of the iterations, then ``final_high``."""
    ramp = max(1, int(round(0.75 * n_iter)) - 1)
    f = min(1.0, (it - 1) / ramp)
    return ini_high + f * (final_high - ini_high)


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


def _subplan(plan, keep):
    return {k: (v[keep] if isinstance(v, np.ndarray) and v.shape[:1] == plan["row"].shape else v)
            for k, v in plan.items()}


def _write_back(plan, sub, keep):
    for k in ("rot", "tilt", "psi", "origin_x", "origin_y", "class_number", "pmax", "loglike", "nsig"):
        plan[k][keep] = sub[k]


def _init(args, size):
    check_writable_dir(args.output)
    star = read_particles(args.input)
    check_box(star)
    check_stacks(star)
    warn_absurd_values(star)
    box, apix = int(star.box[0]), float(star.pixel_size[0])
    if args.K < 1 or args.K > star.n:
        raise MpiEmError(f"--K must be between 1 and the number of particles ({star.n}), got {args.K}")
    if args.batch_size < 1 or args.iter < 1:
        raise MpiEmError(f"--batch-size and --iter must be >= 1, got {args.batch_size} and {args.iter}")
    if not 0.0 < args.update_weight <= 1.0:
        raise MpiEmError(f"--update-weight must be in (0, 1], got {args.update_weight}")
    if not args.ini_high >= args.final_high > 0:
        raise MpiEmError(f"--ini-high ({args.ini_high} Å) must be >= --final-high ({args.final_high} Å) > 0")
    symmetry_matrices(args.sym)
    plans = make_plan(star, size, seed=args.seed)
    first_class = np.random.default_rng([int(args.seed), 13]).integers(1, args.K + 1, star.n)
    for p in plans:
        k = len(p["row"])
        # no reference: every pose starts unknown (the STAR file's angles and origins are not used)
        for f in ("rot", "tilt", "psi", "origin_x", "origin_y", "pmax", "loglike"):
            p[f] = np.zeros(k)
        p["nsig"] = np.zeros(k, dtype=np.int64)
        p["class_number"] = first_class[p["row"]]
        p["half"] = np.ones(k, dtype=np.int64)
    meta = {"box": box, "pixel_size": apix, "n": star.n, "K": int(args.K)}
    return plans, meta, star


def run(args, comm) -> dict:
    t_start = time.time()
    args.input = os.path.abspath(args.input)
    err, res = None, None
    if comm.rank == 0:
        try:
            res = _init(args, comm.size)
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
    n_shells = box // 2 + 1
    pad = args.pad
    mask = reference_mask(box, apix, args, 3, xp)
    r_top = default_r_max(box)
    final_high = max(args.final_high, 2.5 * apix)
    r_of = lambda res_A: float(min(r_top, max(3.0, box * apix / res_A)))  # noqa: E731
    if comm.rank == 0:
        log.info("initial-model: %d particles, box %d, %.3f Å/px, K=%d, %d iterations of %d particles, %.1f -> "
                 "%.1f Å, %d rank(s); rank 0 on %s", n, box, apix, K, args.iter, min(args.batch_size, n),
                 args.ini_high, final_high, comm.size, device)
    images = ImageCache(xp, False)
    pinned = pinned_wanted(xp)

    # ---- noise spectrum from every image, and the random start (random poses and classes of a random subset)
    start_rows = minibatch_rows(n, args.batch_size, args.seed, 0)
    r0 = r_of(args.ini_high)
    rots = random_rotations(n, args.seed)

    def first_pass():
        geom = SliceGeometry(box, pad=pad, xp=xp)
        sh = shell_of_points(geom)
        s_sum, s_cnt = np.zeros(n_shells), np.zeros(n_shells)
        for sl, imgs in images.batches(plan, E_BATCH, pinned=pinned):
            X, _ = prepare_batch(imgs, plan, sl, geom, box, apix, use_ctf=False)
            a, b = sigma2_from_images(X, sh, n_shells)
            s_sum += a
            s_cnt += b
        return s_sum, s_cnt

    s_sum, s_cnt = collective_step(comm, first_pass)
    tot = np.concatenate([s_sum, s_cnt])
    allreduce_sum(comm, tot)
    sigma2 = np.where(tot[n_shells:] > 0, tot[:n_shells] / np.maximum(tot[n_shells:], 1), 1.0)

    def random_start():
        geom = SliceGeometry(box, r_max=r0, pad=pad, xp=xp)
        inv_s2 = inverse_sigma2_points(sigma2, shell_of_points(geom), xp)
        F_acc = xp.zeros((K,) + geom.vol_shape, dtype=xp.complex128)
        W_acc = xp.zeros((K,) + geom.vol_shape, dtype=xp.float64)
        keep = np.isin(plan["row"], start_rows)
        sub = _subplan(plan, keep)
        for sl, imgs in images.batches(sub, E_BATCH, pinned=pinned):
            X, ctf = prepare_batch(imgs, sub, sl, geom, box, apix, use_ctf=not args.no_ctf)
            if ctf is None:
                ctf = xp.ones(X.shape, dtype=xp.float32)
            wts = (ctf * inv_s2[None, :]).astype(xp.float32)
            insert(F_acc, W_acc, 3, xp.asarray(rots[sub["row"][sl]]), xp.asarray(sub["class_number"][sl] - 1),
                   X * wts, ctf * wts, geom)
        synchronize(xp)
        return F_acc, W_acc

    F_acc, W_acc = collective_step(comm, random_start)
    maps, _ = reduce_and_reconstruct_3d(comm, F_acc, W_acc, box, pad, r0, args.tau2_fudge, False)
    del F_acc, W_acc
    model = to_host(maps).astype(np.float64)
    check_finite_maps(model, 0)
    class_prior = np.full(K, 1.0 / K)
    offset_sigma = args.offset_range / 2.0
    perturb = 0.0
    history = []
    sym_ops = symmetry_matrices(args.sym) if symmetry_matrices(args.sym).shape[0] > 1 else None

    def e_step(sub, r_cur, final):
        """E-step over the rank's rows of ``sub`` against the current model -> accumulators, stats."""
        nonlocal perturb
        geom = SliceGeometry(box, r_max=r_cur, pad=pad, xp=xp)
        shells = shell_of_points(geom)
        inv_s2 = inverse_sigma2_points(sigma2, shells, xp)
        refs = References(xp.asarray(model.astype(np.float32)), 3, pad, mask=mask)
        step = angular_step(args.healpix_order)
        spec = SearchSpec(dim=3, n_classes=K,
                          global_mats=global_grid(3, args.healpix_order, "C1", xp, perturb_deg=perturb * step),
                          local_mats=None, fine_mats=fine_offsets(3, step, xp), offset_range=args.offset_range,
                          offset_step=args.offset_step, offset_sigma=offset_sigma,
                          offset_perturb=perturb * args.offset_step, n_select=4, class_select=10,
                          log_class_prior=xp.asarray(np.log(np.maximum(class_prior, 1e-10)), dtype=xp.float32))

        def work():
            F_acc = xp.zeros((K,) + geom.vol_shape, dtype=xp.complex128)
            W_acc = xp.zeros((K,) + geom.vol_shape, dtype=xp.float64)
            stats = Stats.zeros(n_shells, K)
            for sl, imgs in images.batches(sub, E_BATCH, pinned=pinned):
                X, ctf = prepare_batch(imgs, sub, sl, geom, box, apix, use_ctf=not args.no_ctf)
                res = expectation_batch(X, ctf, inv_s2, shells, refs, xp.zeros(sl.stop - sl.start, dtype=xp.int64),
                                        current_mats(sub, sl, 3, xp), xp.asarray(sub["class_number"][sl] - 1),
                                        spec, geom, F_acc, W_acc, stats, n_shells,
                                        prior_offsets=image_shifts_px(sub, sl, apix))
                update_plan_poses(sub, sl, res, 3, apix)
            if final and sym_ops is not None:  # linear: each rank symmetrises its partial sums
                symmetrise(F_acc, W_acc, sym_ops)
            synchronize(xp)
            return F_acc, W_acc, stats

        F_acc, W_acc, stats = collective_step(comm, work)
        vec = stats.as_vector()
        allreduce_sum(comm, vec)
        stats = Stats.from_vector(vec, n_shells, K)
        maps, _ = reduce_and_reconstruct_3d(comm, F_acc, W_acc, box, pad, r_cur, args.tau2_fudge, False)
        return to_host(maps).astype(np.float64), stats

    def update_model_stats(stats):
        nonlocal sigma2, class_prior, offset_sigma
        cnt = stats.sigma2_count
        sigma2 = np.where(cnt > 0, stats.sigma2_sum / np.maximum(cnt, 1), sigma2)
        if stats.class_weight.sum() > 0:
            class_prior = stats.class_weight / stats.class_weight.sum()
        if stats.offset_w > 0:
            offset_sigma = float(np.clip(np.sqrt(stats.offset_sq / (2 * stats.offset_w)), args.offset_step,
                                         args.offset_range))

    resolutions = []
    for it in range(1, args.iter + 1):
        t_it = time.time()
        res_A = max(schedule(it, args.iter, args.ini_high, final_high), final_high)
        r_cur = r_of(res_A)
        perturb = next_perturbation(perturb, 0.5, args.seed, it)
        rows = minibatch_rows(n, args.batch_size, args.seed, it)
        keep = np.isin(plan["row"], rows)
        sub = _subplan(plan, keep)
        maps, stats = e_step(sub, r_cur, False)
        _write_back(plan, sub, keep)
        check_finite_maps(maps, it)
        w = args.update_weight
        model = maps if it == 1 else (1.0 - w) * model + w * maps
        update_model_stats(stats)
        history.append([float(x) for x in class_prior])
        resolutions.append(res_A)
        if comm.rank == 0:
            log.info("iteration %d: %d particles at %.1f Å (r %.0f px), log-likelihood %.4g, class sizes %s, "
                     "%.1f s", it, len(rows), res_A, r_cur, stats.loglike,
                     " ".join(f"{x:.2f}" for x in class_prior), time.time() - t_it)
        root_step(comm, _write_iteration, args.output, it, model, apix, class_prior, res_A)

    if not args.no_final_pass:
        t_f = time.time()
        r_cur = r_of(final_high)
        full = _subplan(plan, np.ones(len(plan["row"]), dtype=bool))
        model, stats = e_step(full, r_cur, True)
        _write_back(plan, full, np.ones(len(plan["row"]), dtype=bool))
        check_finite_maps(model, args.iter + 1)
        update_model_stats(stats)
        if comm.rank == 0:
            log.info("final pass over all %d particles at %.1f Å%s: %.1f s", n, final_high,
                     f", symmetrised with {args.sym}" if sym_ops is not None else "", time.time() - t_f)
    elif sym_ops is not None and comm.rank == 0:
        log.warning("warning: --sym %s is applied by the final pass only; with --no-final-pass the maps are C1",
                    args.sym)
    counts = np.bincount(plan["class_number"] - 1, minlength=K).astype(np.float64)
    allreduce_sum(comm, counts)
    particles = gather_particles(comm, plan)
    root_step(comm, _write_final, args.output, star_rank0, particles, model, apix, counts, class_prior,
              np.asarray(history))
    summary = {"mode": "initial-model", "iterations": args.iter, "counts": counts.tolist(),
               "class_prior": class_prior.tolist(), "seconds": time.time() - t_start, "ranks": comm.size}
    if comm.rank == 0:
        log.info("initial-model finished: %d iterations in %.1f s; particles per class %s", args.iter,
                 summary["seconds"], " ".join(str(int(c)) for c in counts))
    return summary


def central_slices(vol) -> np.ndarray:
    """(3, N, N): the central xy, xz and yz sections of a map."""
    c = vol.shape[0] // 2
    return np.stack([vol[c], vol[:, c], vol[:, :, c]])


def _slices_png(path, model, labels):
    from ..plots import montage_png

    tiles, names = [], []
    for k, m in enumerate(model):
        for s, axis in zip(central_slices(m), ("z", "y", "x")):
            tiles.append(s)
            names.append(f"{labels[k]} {axis}=0")
    montage_png(path, np.asarray(tiles), labels=names, ncols=3)


def _write_iteration(out, it, model, apix, class_prior, res_A):
    tag = f"run_it{it:03d}"
    for k in range(model.shape[0]):
        write_map(os.path.join(out, f"{tag}_class{k + 1:03d}.mrc"), model[k], apix)
    _slices_png(os.path.join(out, f"{tag}_slices.png"), model,
                [f"class {k + 1} ({100 * p:.0f}%), {res_A:.0f} Å" for k, p in enumerate(class_prior)])


def _write_final(out, star, particles, model, apix, counts, class_prior, history):
    import pandas as pd
    import starfile

    from ..io import atomic_path
    from ..plots import class_sizes_png

    K = model.shape[0]
    for k in range(K):
        write_map(os.path.join(out, f"run_class{k + 1:03d}.mrc"), model[k], apix)
    _slices_png(os.path.join(out, "run_slices.png"), model,
                [f"class {k + 1}: {int(c)}" for k, c in enumerate(counts)])
    up = {"rlnAngleRot": particles["rot"], "rlnAngleTilt": particles["tilt"], "rlnAnglePsi": particles["psi"],
          "rlnOriginXAngst": particles["origin_x"], "rlnOriginYAngst": particles["origin_y"],
          "rlnClassNumber": particles["class_number"], "rlnMaxValueProbDistribution": particles["pmax"],
          "rlnLogLikeliContribution": particles["loglike"], "rlnNrOfSignificantSamples": particles["nsig"]}
    write_particles(os.path.join(out, "run_data.star"), star, updates=up)
    classes = pd.DataFrame({"rlnReferenceImage": [f"run_class{k + 1:03d}.mrc" for k in range(K)],
                            "rlnClassDistribution": class_prior, "rlnNrParticles": counts.astype(np.int64)})
    with atomic_path(os.path.join(out, "run_model.star")) as tmp:
        starfile.write({"model_classes": classes}, tmp, float_format=None)
    if len(history):
        class_sizes_png(os.path.join(out, "run_class_sizes.png"), history, title="initial-model: class sizes")


__all__ = ["add_arguments", "run", "schedule", "minibatch_rows", "random_rotations"]
