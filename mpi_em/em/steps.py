"""One EM iteration's steps, on every rank: the first pass (noise spectrum; 2D references), the E-step over the
rank's particles, the M-step (reduction and reconstruction), the model updates and the schedule. What they share
for the whole job is an :class:`EMRun`; what changes from one iteration to the next is its
:class:`~mpi_em.em.state.EMState`."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backend import is_gpu_array, synchronize, to_host, xp_of
from ..distributed import allreduce_sum, bcast_large, collective_step, reference_group
from ..errors import MpiEmError
from ..fourier import SliceGeometry, default_r_max, padded_reach
from ..symmetrise import symmetrise
from ..geometry import angular_distance, euler_to_matrix
from ..particles import ImageCache, pinned_wanted
from ..io.mrc import map_statistics
from ..symmetry import symmetry_matrices
from .classes import RESEED_AMPLITUDE, center_2d, first_shell_2d, reseed_classes, reseeded_direction_prior
from ..masks import auto_solvent_mask
from .engine import (Stats, current_mats, end_e_step, expectation_batch, image_shifts_px, inverse_sigma2_points,
                     masked_points, prepare_batch, shell_of_points, sigma2_from_images, update_plan_poses)
from .inputs import image_mask_radius, reference_mask, reference_radius
from .model import (CroppedAccumulators, batch_rounds, e_step_accumulators, lowpass, reduce_and_reconstruct_2d,
                    reduce_and_reconstruct_3d, routed_step)
from .references import References
from .schedule import search_spec, update_schedule
from .state import EMState, Mode

log = logging.getLogger("mpi_em")


@dataclass(frozen=True)
class LightenedEStep:
    """What the memory check chose for the largest image size and pose grid the options allow, where it had to
    lighten the E-step (a smaller batch, the grid in chunks): each iteration chooses again (:func:`iteration_batch`)."""

    inputs: Any           # the memory model's inputs the job runs with (mpi_em.memory.EMInputs)
    limit: int | None     # bytes per rank (--max-memory, or the device's share)
    batch_max: int        # --batch as given


@dataclass
class EMRun:
    """What every iteration of one run uses besides the state."""

    args: Any
    comm: Any
    mode: Mode
    state: EMState
    plan: dict            # this rank's particles (rows, half sets, folds, poses, ...)
    meta: dict            # box, pixel_size, n, K, folds, input (the same on every rank)
    star: Any             # rank 0: (optics, particles) with image names that resolve from the output folder
    device: str
    xp: Any
    solvent: Any          # --solvent-mask on the host, or None
    sym_ops: Any          # point-group matrices applied to the summed accumulators, or None
    images: ImageCache
    owned_accumulators: bool = False  # the E-step accumulates only this rank's kz planes (--owned-accumulators)
    auto_mask: bool = False           # --auto-mask: ``solvent`` recomputed from the references each iteration
    accumulate: str = "double"        # the accumulators' precision, 'double' or 'single' (--accumulate; single:
    #                                   the 3D references' Fourier volumes in complex64 too)
    memory: "LightenedEStep | None" = None  # where the memory check lightened the E-step, else None
    step_sync: bool = False           # the E-step's steps end with a synchronisation (the driver's pool: a limit)
    tau2_ref: Any = None              # classification: this iteration's signal prior, (K, n_shells) on the host
    #                                   (``References.power``, :func:`first_prior_2d`; set with the references,
    #                                   used by the M-step)
    # GPU ranks: the last M-step's maps on the device and the host array they were copied to (``state.maps`` then);
    # the next references are made from them while the state's maps are still that array (no upload); dropped by
    # the next references() whether used or not
    device_maps: Any = None

    @property
    def box(self) -> int:
        return self.meta["box"]

    @property
    def apix(self) -> float:
        return self.meta["pixel_size"]

    @property
    def K(self) -> int:  # noqa: N802 - the number of classes, as the literature names it
        return self.meta["K"]

    @property
    def folds(self) -> int:  # resolved on rank 0 (the default depends on the box); 1 outside refine3d
        return self.meta["folds"]


def first_pass(job: EMRun) -> None:
    """The noise spectrum from the images; 2D: the references from the first iteration's random subsets.

    With --zero-mask, RELION's first noise spectrum: from the masked images, less the power of their average
    (:func:`initial_noise`). Without it the images' mean power, as before --zero-mask existed: the average's power
    left in. On the auto-mask test's small particle (box 32, 2 refine3d iterations, 4 data seeds) subtracting it
    gave maps 0.3-1.7% closer to the truth but a gold-standard resolution 0.3 shell more optimistic on average
    (1.06 against 0.74 shell beyond the masked map's resolution against the truth), so only --zero-mask does it."""
    args, comm, xp, plan, state = job.args, job.comm, job.xp, job.plan, job.state
    box, apix, K, dim = job.box, job.apix, job.K, job.mode.dim
    n_shells = box // 2 + 1

    def work():
        geom = SliceGeometry(box, pad=args.pad, xp=xp)
        sh = shell_of_points(geom)
        s_sum, s_cnt = np.zeros(n_shells), np.zeros(n_shells)
        sums = xp.zeros((K, box, box), dtype=xp.float64) if dim == 2 else None
        radius = image_mask_radius(box, apix, args) if getattr(args, "zero_mask", False) else None
        # --zero-mask: the images' transforms summed, for their average
        x_sum = np.zeros(sh.shape[0] if radius is not None else 0, dtype=np.complex128)
        for sl, imgs in job.images.batches(plan, args.batch, pinned=pinned_wanted(xp)):  # on xp: one copy
            if radius is None:
                X, _ = prepare_batch(imgs, plan, sl, geom, box, apix, use_ctf=False)
            else:  # RELION's first noise spectrum with --zero_mask: from the masked images
                X = masked_points(imgs, plan, sl, geom, apix, radius)
            a, b = sigma2_from_images(X, sh, n_shells)
            s_sum += a
            s_cnt += b
            if radius is not None:  # a GEMM: no reduction kernel
                x_sum += to_host(xp.ones((1, X.shape[0]), dtype=X.dtype) @ X)[0]
            if dim == 2:  # per-class sums of the images as one product: one_hot(class)^T @ images
                cls = xp.asarray(plan["class_number"][sl] - 1)
                onehot = (cls[:, None] == xp.arange(K)[None, :]).astype(xp.float64)
                flat = imgs.astype(xp.float64).reshape(len(cls), -1)
                sums += (onehot.T @ flat).reshape(sums.shape)
        return s_sum, s_cnt, sums, x_sum, to_host(sh)

    s_sum, s_cnt, sums, x_sum, sh = collective_step(comm, work)
    tot = np.concatenate([s_sum, s_cnt, x_sum.real, x_sum.imag, [len(plan["index"])]])
    allreduce_sum(comm, tot)
    m = x_sum.shape[0]
    x_sum = tot[2 * n_shells:2 * n_shells + m] + 1j * tot[2 * n_shells + m:2 * n_shells + 2 * m]
    mean_image = x_sum / max(tot[-1], 1.0) if getattr(args, "zero_mask", False) else None
    state.sigma2 = initial_noise(tot[:n_shells], tot[n_shells:2 * n_shells], mean_image, sh)
    if dim == 2:
        allreduce_sum(comm, sums)
        counts = np.bincount(plan["class_number"] - 1, minlength=K).astype(np.float64)
        allreduce_sum(comm, counts)
        avg = to_host(sums) / np.maximum(counts, 1)[:, None, None]
        shell = first_shell_2d(box)  # the first size, state.r_cur, is this plus --incr-size (EMState.initial)
        if comm.rank == 0:
            log.info("first current size: r %d px (the first resolution %.1f Å, shell %d, plus --incr-size %d)",
                     state.r_cur, box * apix / shell, shell, args.incr_size)
        # low-passed at the first size, not at the first shell as RELION's: references that alike (shell 2 at box
        # 32) gave every particle the same ranking of the classes and all went into one in iteration 1
        # (benchmarks/results/class2d-size/cpu-2026-12-05/)
        state.maps = lowpass(avg, box, apix, box * apix / state.r_cur).astype(np.float32)


def initial_noise(power_sum, power_count, mean_image, shells) -> np.ndarray:
    """The first noise spectrum per shell, RELION's (``MlOptimiser::setSigmaNoiseEstimatesAndSetAverageImage``):
    the images' mean power / 2 (``power_sum`` / ``power_count``, :func:`mpi_em.em.engine.sigma2_from_images`)
    less the power / 2 of their average (``mean_image`` (m,) at the in-ball points of ``shells`` (m,); None: not
    subtracted), which holds the particles' common signal (and 1 / n of the noise); a shell left <= 0 takes its
    neighbour's value (the one below, else above), a shell without points 1."""
    n_shells = power_sum.shape[0]
    has = power_count > 0
    if mean_image is None:
        return np.where(has, power_sum / np.maximum(power_count, 1), 1.0)
    avg_cnt = np.bincount(shells, minlength=n_shells)[:n_shells]
    avg = np.bincount(shells, weights=0.5 * np.abs(mean_image) ** 2, minlength=n_shells)[:n_shells]
    s2 = np.where(has, power_sum / np.maximum(power_count, 1), 1.0)
    s2 -= np.where(avg_cnt > 0, avg / np.maximum(avg_cnt, 1), 0.0)
    for i in np.flatnonzero(has & (s2 <= 0)):
        ok = np.flatnonzero(has & (s2 > 0))
        if ok.size:
            below = ok[ok < i]
            s2[i] = s2[below[-1]] if below.size else s2[ok[0]]
    return np.where(has, s2, 1.0)


def reference_volumes(plan, K: int, folds: int) -> np.ndarray:
    """The references this rank's particles are aligned against (gold-standard jobs): the K volumes of each
    reference set it holds (:func:`mpi_em.distributed.reference_group`), in the job's numbering. A rank with
    no particles takes the first set (it projects nothing)."""
    groups = np.unique(reference_group(plan["half"], plan["row"], folds))
    if groups.size == 0:
        groups = np.zeros(1, dtype=np.int64)
    return (groups[:, None] * K + np.arange(K)[None, :]).ravel()


def references(job: EMRun) -> References:
    """This iteration's references, masked and Fourier-transformed on the rank's device (refine3d with folds: each
    fold's reference is its half without it; the half map itself before the first iteration)."""
    state, folds = job.state, job.folds
    if job.auto_mask:  # from the current references, on rank 0, the same on every rank
        radius = reference_radius(job.box, job.apix, job.args)
        res = state.resolution[-1] if state.resolution else job.args.ini_high
        job.solvent = bcast_large(job.comm, auto_solvent_mask(state.maps, res, job.apix, radius)
                                  if job.comm.rank == 0 else None)
    # the mask is made here and dropped with the masked maps: not held on the device through the E-step and the
    # M-step (512 MiB at box 512, where the E-step is sized to the memory limit)
    mask = reference_mask(job.box, job.apix, job.args, job.mode.dim, job.xp, job.solvent)
    on_device, job.device_maps = job.device_maps, None
    if folds > 1:
        ref_maps = state.references if state.references is not None else np.repeat(state.maps, folds, axis=0)
    elif on_device is not None and on_device[1] is state.maps:  # the M-step's maps on the device, unchanged since
        ref_maps = on_device[0]
    else:
        ref_maps = state.maps
    del on_device
    volumes = reference_volumes(job.plan, job.K, folds) if job.mode.gold else None
    classify = not job.mode.gold
    first_2d = job.mode.dim == 2 and state.iter == 0   # class2d's first prior: the mean reference's (first_prior_2d)
    chosen = ref_maps if volumes is None else ref_maps[xp_of(ref_maps).asarray(volumes)]
    n_total = len(ref_maps)
    del ref_maps  # the device maps given back with the transforms' temporaries, below
    refs = References(job.xp.asarray(chosen), job.mode.dim, job.args.pad, mask=mask,
                      single=job.accumulate == "single", volumes=volumes, n_total=n_total,
                      power_r_max=state.r_cur if classify and not first_2d else None,
                      reach=padded_reach(state.r_cur, job.args.pad))  # CPU ranks: the E-step's part re-laid
    if classify:  # the signal prior, RELION's: the power of the references the E-step aligns against
        job.tau2_ref = first_prior_2d(job, refs) if first_2d else refs.power
    del mask, chosen
    from ..memory import release_device_memory

    # the transforms' temporaries and plans given back before the E-step allocates its accumulators (measured at
    # box 512: the pool kept ~10 GiB of them through the E-step)
    release_device_memory(job.xp)
    return refs


def first_prior_2d(job: EMRun, refs: References) -> np.ndarray:
    """class2d's signal prior in the first iteration of a new run (later ones: the power of each class's reference,
    ``refs.power``, RELION's ``MlModel::setFourierTransformMaps`` before each E-step): the power of the mean of the
    first references, the random subsets' averages, i.e. of the average of all the particles, for every class
    (RELION's first references are that average; the transform of the mean is the mean of ``refs.F``). Each random
    subset's average holds its particles' noise (1 / 50 of a particle's at 50 particles a class), whose power at
    high frequency would be taken for signal (benchmarks/results/class2d-reseed/cpu-box256-2026-12-04/)."""
    from .model import reference_power

    mean = refs.F.mean(axis=0, keepdims=True)
    return np.repeat(reference_power(mean, job.box, job.args.pad, job.state.r_cur), job.K, axis=0)


def iteration_batch(job: EMRun) -> None:
    """Where the memory check had to lighten the E-step for the largest image size and pose grid the options
    allow (a smaller batch, the grid in chunks), this iteration's own size and grid choose the batch and chunks
    (:func:`mpi_em.memory.adapt_iteration`, collective): early iterations at a small size get the batch back."""
    if job.memory is None:
        return
    from ..memory import _grid_size, adapt_iteration
    from ..sampling import translation_grid

    plan, state, args = job.memory, job.state, job.args
    if job.mode.dim == 2:
        C = int(np.arange(0.0, 360.0, args.psi_step).size)
    else:
        C = 0 if state.local else _grid_size(state.order, getattr(args, "sym", "C1"))
    T = int(translation_grid(state.offset_range, 2.0 * state.offset_step).shape[0])
    got = adapt_iteration(job.comm, plan.inputs, plan.limit, state.r_cur, C, T, plan.batch_max)
    if got is None or (got.batch, got.grid_chunk) == (args.batch, args.grid_chunk):
        return
    if job.comm.rank == 0:
        log.info("memory: E-step batch %d%s at r %.0f px and %d orientations per class", got.batch,
                 f", the grid in chunks of {got.grid_chunk}" if got.grid_chunk else ", the grid kept whole",
                 state.r_cur, C)
    args.batch, args.grid_chunk = got.batch, got.grid_chunk


def expectation(job: EMRun, it: int, geom: SliceGeometry, refs: References, timer) -> tuple[dict, Stats]:
    """E-step over this rank's particles against ``refs`` into local accumulators -> ({"F", "W"}, statistics
    summed over ranks)."""
    args, mode, state, plan, xp = job.args, job.mode, job.state, job.plan, job.xp
    box, apix, K, folds, dim = job.box, job.apix, job.K, job.folds, mode.dim
    n_shells = box // 2 + 1
    shells = shell_of_points(geom)
    inv_s2 = inverse_sigma2_points(state.sigma2, shells, xp)
    iteration_batch(job)
    spec = search_spec(state, args, mode, it, K, getattr(args, "sym", "C1"), xp)
    V = 2 * folds if mode.gold else K
    vol_shape = geom.vol_shape if dim == 3 else (geom.npad, geom.npad // 2 + 1)
    radius = image_mask_radius(box, apix, args) if getattr(args, "zero_mask", False) else None
    n_dir = 0 if spec.direction_log_prior is None else int(spec.direction_log_prior.shape[1])

    def e_step():
        F_acc, W_acc = e_step_accumulators(job.comm, V, vol_shape, xp, job.owned_accumulators, job.sym_ops,
                                           precision=job.accumulate, geom=geom if dim == 3 else None)
        if isinstance(F_acc, CroppedAccumulators) and job.comm.rank == 0:
            log.info("iteration %d: accumulators in the %d^3 cube that r %.0f px reaches (%.0f%% of the %d^3 "
                     "volume)", it, F_acc.side, geom.r_max, 100.0 * F_acc.F.size / (V * np.prod(vol_shape)),
                     geom.npad)
        stats = Stats.zeros(n_shells, K, n_dir)
        batches = batch_rounds(F_acc, job.images.batches(plan, args.batch, pinned=pinned_wanted(xp)),
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
                X_insert = None
                if radius is not None:  # searched: the masked images; inserted: the unmasked ones
                    X, X_insert = masked_points(imgs, plan, sl, geom, apix, radius), X
            base = xp.asarray(reference_group(plan["half"][sl], plan["row"][sl], folds) * K) if mode.gold \
                else xp.zeros(sl.stop - sl.start, dtype=xp.int64)
            res = expectation_batch(X, ctf, inv_s2, shells, refs, base, current_mats(plan, sl, dim, xp),
                                    xp.asarray(plan["class_number"][sl] - 1), spec, geom, F_acc, W_acc,
                                    stats, n_shells, timer=timer, prior_offsets=image_shifts_px(plan, sl, apix),
                                    X_insert=X_insert)
            del X, X_insert, ctf
            update_plan_poses(plan, sl, res, dim, apix)
        if not isinstance(F_acc, CroppedAccumulators):
            symmetrised(F_acc, W_acc)
        synchronize(xp)
        return {"F": F_acc, "W": W_acc}, stats

    def symmetrised(F_acc, W_acc):
        if job.sym_ops is not None and W_acc is not None:  # linear: each rank symmetrises its partial sums
            with timer("symmetrise"):
                symmetrise(F_acc, W_acc, job.sym_ops)

    def hand_over(acc):  # cropped accumulators to the full layout, once the references are given back
        with timer("uncrop"):
            acc["F"], acc["W"] = acc["F"].full()
        symmetrised(acc["F"], acc["W"])
        synchronize(xp)
        return acc

    acc, stats = collective_step(job.comm, routed_step(e_step))
    end_e_step(refs, spec, xp)  # the references, the grid's projections, the device pool given back
    if isinstance(acc["F"], CroppedAccumulators):
        if job.comm.size > 1:  # the reduction to the planes' owners works in the pad x box layout
            acc = collective_step(job.comm, hand_over, acc)
        else:  # one rank: the M-step works on the cube (each volume put into the full layout for its FFT only)
            acc = {"F": acc["F"].F, "W": acc["F"].W}
            symmetrised(acc["F"], acc["W"])
    vec = stats.as_vector()
    allreduce_sum(job.comm, vec)
    return acc, Stats.from_vector(vec, n_shells, K, n_dir)


def maximisation(job: EMRun, it: int, acc: dict, stats: Stats, timer):
    """M-step: the accumulators reduced and the references reconstructed -> (maps on the device, info); the
    host maps (2D: centred) into the state. ``acc`` is emptied once the reconstruction is done (the accumulators
    stay allocated through it, as :mod:`mpi_em.memory` models)."""
    args, mode, state = job.args, job.mode, job.state
    info = {"loglike": stats.loglike}
    if job.auto_mask:
        info["auto_mask"] = job.solvent  # written as run_itNNN_mask.mrc
    if mode.dim == 3:
        maps, inf = reduce_and_reconstruct_3d(job.comm, acc["F"], acc["W"], job.box, args.pad, state.r_cur,
                                              args.tau2_fudge, mode.gold, fsc_mask=job.solvent,
                                              compress=args.compress, combined=mode.gold, timer=timer,
                                              folds=job.folds, tau2_ref=job.tau2_ref)
    else:
        maps, inf = reduce_and_reconstruct_2d(job.comm, acc["F"], acc["W"], job.box, args.pad, state.r_cur,
                                              args.tau2_fudge, job.tau2_ref, timer=timer)
    acc.clear()
    from ..memory import release_device_memory

    release_device_memory(job.xp)  # the accumulators' blocks, before the next references are made
    state.references = to_host(inf.pop("references")) if "references" in inf else None
    info.update(inf)
    check_finite_maps(maps, it)  # the same maps on every rank: every rank stops here, nobody waits
    maps_h = to_host(maps)
    if mode.dim == 2 and not args.no_center:
        maps_h = center_2d(maps_h)
    elif maps_h is not maps:  # a GPU rank's maps, as the host holds them: the next references' (no upload)
        job.device_maps = (maps, maps_h)
        if mode.dim == 3:  # their MRC header statistics from the device, for the writer (valid for these maps only)
            info["map_stats"] = (maps_h, map_statistics(maps))
    state.maps = maps_h
    if info.get("combined") is not None:
        if is_gpu_array(info["combined"]):
            info["combined_stats"] = map_statistics(info["combined"][None])[0]
        info["combined"] = to_host(info["combined"])
    return maps, info


def update_model(job: EMRun, it: int, stats: Stats, info: dict, maps, prev: dict, final: bool) -> None:
    """Noise, class priors, offset prior, pose changes, then the schedule (identical on every rank: from
    reduced sums)."""
    args, comm, mode, state, plan = job.args, job.comm, job.mode, job.state, job.plan
    cnt = stats.sigma2_count
    state.sigma2 = np.where(cnt > 0, stats.sigma2_sum / np.maximum(cnt, 1), state.sigma2)
    if stats.class_weight.sum() > 0:
        state.class_prior = stats.class_weight / stats.class_weight.sum()
    state.class_history.append([float(x) for x in state.class_prior])
    dw = stats.direction_weight
    if dw is not None and dw.sum() > 0:  # RELION's pdf_direction: the weights / their sum (over the classes too)
        state.direction_prior = (dw / dw.sum()).reshape(len(state.class_prior), -1)
    if not mode.refine and getattr(args, "reseed_below", 0) > 0 and not final:
        amp = getattr(args, "reseed_amplitude", None)
        state.maps, state.class_prior, done_k = reseed_classes(state.maps, state.class_prior, state.r_cur,
                                                               args.reseed_below, args.seed, it, job.box, job.apix,
                                                               RESEED_AMPLITUDE if amp is None else amp, xp=job.xp)
        if done_k and state.direction_prior is not None:
            state.direction_prior = reseeded_direction_prior(state.direction_prior, state.class_prior, done_k)
        if done_k and comm.rank == 0:
            log.info("iteration %d: re-seeded class(es) %s from the largest class", it,
                     ", ".join(str(k + 1) for k in done_k))
    if stats.offset_w > 0:
        state.offset_sigma = float(np.clip(np.sqrt(stats.offset_sq / (2 * stats.offset_w)), args.offset_step,
                                           args.offset_range))
    if mode.dim == 3:
        A0 = euler_to_matrix(prev["rot"], prev["tilt"], prev["psi"])
        A1 = euler_to_matrix(plan["rot"], plan["tilt"], plan["psi"])
        ch = angular_distance(A0, A1, sym=None if args.sym.upper() == "C1" else symmetry_matrices(args.sym))
    else:
        ch = np.abs((plan["psi"] - prev["psi"] + 180) % 360 - 180)
    moved = np.hypot(plan["origin_x"] - prev["origin_x"], plan["origin_y"] - prev["origin_y"]) / job.apix
    tot = np.array([ch.sum(), len(ch), moved.sum(), np.sum(plan["pmax"])], dtype=np.float64)
    allreduce_sum(comm, tot)
    info["mean_pmax"] = float(tot[3] / max(tot[1], 1))
    state.ang_change.append(float(tot[0] / max(tot[1], 1)))
    state.offset_change = float(tot[2] / max(tot[1], 1))       # px, mean over particles
    state.accuracy = stats.angle_spread / max(stats.offset_w, 1)
    state.accuracy_trans = float(np.sqrt(stats.offset_var / max(stats.offset_w, 1)))  # px, per axis
    # refine3d: the half maps' FSC on their device (two 128^3 FFTs: 0.16 s on a host core, ~1 ms on a GPU)
    r_used = state.r_cur  # this iteration's current size (the schedule below sets the next one)
    info["r_used"] = r_used  # the model STAR's rlnCurrentImageSize, as RELION's: the size the iteration used
    was_final = state.final
    update_schedule(state, info, mode, args, job.box, job.apix, maps, masked=job.solvent is not None)
    state.iter = it
    if final or state.final:
        # converged (or the last allowed iteration). refine3d then runs one more iteration, as RELION's
        # auto-refine does, with the same sampling and all the data to Nyquist (the loop sets the full size for a
        # final iteration): the sizes until then stop a few shells past the resolution, so without it the final
        # map has no data beyond them. Repeating the same size instead made the map worse
        # (benchmarks/results/refine3d-monotonic/). The final outputs are those of the best gold-standard
        # iteration (final_iteration), this one or an earlier one.
        state.done = final or not full_size_wanted(args, mode, r_used, job.box)
        if not final and not was_final and comm.rank == 0:
            log.info("iteration %d: converged (resolution and poses no longer improve at the finest sampling)%s", it,
                     "" if state.done else "; one more iteration, at the full image size")


def full_size_wanted(args, mode: Mode, r_cur: float, box: int) -> bool:
    """Whether refine3d's last iteration is to use the full image size: gold-standard jobs whose current size
    is below it (--no-final-full-size: never; absent in checkpoints of earlier versions: on)."""
    return mode.gold and bool(getattr(args, "final_full_size", True)) and r_cur < default_r_max(box)


def check_finite_maps(maps, it: int) -> None:
    """Stop the job with a clear error when an iteration's maps hold NaN or infinity (a numerical failure would
    otherwise look like a refinement that converged at the box size: benchmarks/results/refine3d-convergence/,
    zero-variance prior)."""
    xp = xp_of(maps)  # on the maps' device: one reduction, no host pass over the maps (0.03 s at box 256)
    if not bool(xp.isfinite(maps).all()):
        bad = int((~xp.isfinite(maps)).sum())
        raise MpiEmError(f"iteration {it}: the reconstructed maps hold {bad} NaN or infinite voxels "
                         f"(of {maps.size}); stopping instead of refining against them")
