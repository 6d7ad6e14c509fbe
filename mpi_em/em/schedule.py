"""The EM jobs' schedule: each iteration's sampling (:func:`search_spec`), the resolution, the current image size
and refine3d's auto-sampling and convergence decisions after it (:func:`update_schedule`), and which iteration's
files become the final ones (:func:`final_iteration`)."""
from __future__ import annotations

import numpy as np

from ..fourier import default_r_max
from ..fsc import fsc, resolution_at
from ..sampling import angular_step, next_perturbation, next_translations, psi_angles
from .classes import data_vs_prior, data_vs_prior_shells
from .engine import SearchSpec
from .references import fine_offsets, global_grid, local_grid, local_offsets
from .state import EMState, Mode

#: classification: the current resolution is never taken coarser than this shell (RELION's --minres_map, 5)
MINRES_MAP = 5

#: --direction-prior: a class and direction without posterior weight in the last iteration get this prior (RELION
#: skips such poses; log(1e-30) = -69 keeps the sums finite and leaves them no weight)
DIRECTION_PRIOR_FLOOR = 1e-30


def search_spec(state: EMState, args, mode: Mode, it: int, K: int, sym_name: str, xp) -> SearchSpec:
    """Iteration ``it``'s poses and translations; draws the grids' random perturbation (RELION's: angles by
    p x step, translations by p x offset step) into ``state.perturb``."""
    dim = mode.dim
    step = angular_step(state.order) if dim == 3 else args.psi_step
    state.perturb = next_perturbation(state.perturb, getattr(args, "perturb", 0.0), args.seed, it)
    glob = None if state.local else global_grid(dim, state.order, sym_name, xp, psi_step=step,
                                                perturb_deg=state.perturb * step)
    radius = float(getattr(args, "local_radius", 1.5))
    sigma = float(getattr(args, "local_sigma", 0.0)) * step  # degrees
    local_mats, prior = None, None
    if state.local:
        g = local_grid(dim, radius)
        local_mats = local_offsets(dim, step, g, xp)
        if sigma > 0:
            g = g.astype(np.float64)
            angle = np.sqrt((g.reshape(g.shape[0], -1) ** 2).sum(axis=1)) * step  # of each local rotation, degrees
            prior = (-0.5 * (angle / sigma) ** 2).astype(np.float32)
    direction, n_psi = None, 1
    if glob is not None and dim == 3 and getattr(args, "direction_prior", False):
        n_psi = len(psi_angles(state.order))
        D = glob.shape[0] // n_psi
        if state.direction_prior is None or state.direction_prior.shape != (K, D):
            # a new run, or a new sampling: even over the directions (RELION's initialisePdfDirection), each
            # class keeping its share
            state.direction_prior = np.outer(state.class_prior, np.full(D, 1.0 / D))
        direction = xp.asarray(np.log(np.maximum(state.direction_prior, DIRECTION_PRIOR_FLOOR)), dtype=xp.float32)
    return SearchSpec(
        dim=dim, n_classes=K, global_mats=glob, local_mats=local_mats, direction_log_prior=direction, n_psi=n_psi,
        local_log_prior=None if prior is None else xp.asarray(prior), local_sigma_deg=sigma if state.local else 0.0,
        fine_mats=fine_offsets(dim, step, xp), offset_range=state.offset_range,
        offset_step=state.offset_step, offset_sigma=state.offset_sigma,
        offset_perturb=state.perturb * state.offset_step,
        n_select=args.n_select,
        class_select=int(getattr(args, "class_select", 10)),
        log_class_prior=xp.asarray(np.log(np.maximum(state.class_prior, 1e-10)), dtype=xp.float32),
        fixed_class=(it == 1 and K > 1 and dim == 3), grid_chunk=int(getattr(args, "grid_chunk", 0) or 0))


def update_schedule(state: EMState, info: dict, mode: Mode, args, box: int, apix: float, maps,
                    masked: bool = False) -> None:
    """Resolution, current image size and (refine3d) the auto-sampling / convergence decisions."""
    if mode.gold:
        _refine_schedule(state, info, args, box, apix, maps, masked)
        return
    # classification: per class the data-vs-prior SSNR's run from shell 1 while >= 1 (RELION's
    # updateCurrentResolution), the best class's, at least MINRES_MAP shells; the current size that plus
    # --incr-size shells, recomputed every iteration: it shrinks when the resolution does (RELION's
    # updateImageSizeAndResolutionPointers)
    ssnr = data_vs_prior(info)
    if ssnr is not None:
        shell, state.r_cur = classification_size(ssnr, int(getattr(args, "incr_size", 3)), box)
        state.resolution.append(float(box * apix / shell))


def classification_size(ssnr, incr_size: int, box: int) -> tuple[int, float]:
    """A classification's resolution shell and current size from the data-vs-prior SSNR (classes x shells): the
    best class's last shell of the run from shell 1 where it stays >= 1 (:func:`data_vs_prior_shells`), at least
    :data:`MINRES_MAP`; the size that plus ``incr_size`` shells, at most the box's (:func:`default_r_max`)."""
    shell = max(int(data_vs_prior_shells(ssnr).max()), MINRES_MAP)
    return shell, float(min(default_r_max(box), shell + incr_size))


def _refine_schedule(state: EMState, info: dict, args, box: int, apix: float, maps, masked: bool) -> None:
    # unmasked, as RELION's refinement does: a mask shared by both halves correlates their high frequencies;
    # with --solvent-mask the solvent-corrected FSC that set tau^2 (RELION's --solvent_correct_fsc)
    curve = info["fsc_unregularised"].copy() if masked else fsc(maps[0], maps[1])
    # only shells up to the current size carry data; beyond it both halves share the leakage of the crop
    edge = int(np.floor(state.r_cur))
    curve[edge + 1:] = 0.0
    info["fsc_gold"] = curve
    res = resolution_at(curve, box, apix)
    state.resolution.append(res)
    shell = box * apix / res
    # the resolution's shell plus the margin, recomputed every iteration: it shrinks when the resolution does
    # (RELION's updateImageSizeAndResolutionPointers, auto-refine included)
    state.r_cur = float(min(default_r_max(box), np.ceil(shell) + size_margin(curve, edge, info, args, box)))
    improved = res < 0.99 * state.best_res
    state.best_res = min(state.best_res, res)
    step = angular_step(state.order)
    small_change = state.ang_change[-1] < step
    # RELION's auto-sampling: refine the sampling when the resolution or the poses stop improving, but only
    # while the step is coarser than the angular accuracy the posteriors show; otherwise converge.
    # the posterior spread of a global search; of a local one only when well inside its window (radius
    # 1.5 steps): a spread as wide as the window is truncated by it
    if not state.local or state.accuracy < 0.75 * step:
        state.accuracy_global = state.accuracy
    # --settle-poses: RELION's test of the hidden variables (updateOverallChangesInHiddenVariables), the poses have
    # settled when the mean orientation and offset changes are no more than 3% below the smallest so far, or small
    # against the fine sampling (below 0.4 of its step); RELION refines the sampling, and converges, only once they
    # have (by default ours does not wait: benchmarks/results/initial-model/refine-settle-poses-cpu-2026-12-06/)
    ang, off = state.ang_change[-1], state.offset_change
    settled = ((ang < 0.4 * step / 2 or 1.03 * ang >= state.smallest_ang_change)
               and (off < 0.4 * state.offset_step or 1.03 * off >= state.smallest_offset_change))
    state.smallest_ang_change = min(state.smallest_ang_change, ang)
    state.smallest_offset_change = min(state.smallest_offset_change, off)
    if (not improved or small_change) and (settled or not getattr(args, "settle_poses", False)):
        if state.order < args.max_order and step > state.accuracy_global:
            state.order += 1
            if getattr(args, "refine_offsets", False):
                # the translations follow (RELION's): a fine step a quarter below the translational accuracy,
                # a range of 5 x the last offset change, 9 to ~49 coarse translations
                state.offset_step, state.offset_range = next_translations(
                    state.offset_step, state.offset_range, state.accuracy_trans, state.offset_change)
            if state.order >= args.local_from_order:
                state.local = True
            state.no_improve = 0
        elif not improved:
            state.no_improve += 1
            if state.no_improve >= 1:
                state.final = True


def size_margin(curve, edge: int, info: dict, args, box: int) -> int:
    """Shells the next current size reaches past the resolution's: --incr-size, or with --fsc-jump box / 8 while
    the FSC at the size's edge is above 0.2 and the mean largest posterior weight above 0.1 (RELION's
    updateImageSizeAndResolutionPointers: the resolution is then limited by the size, not by the data; low
    posterior peaks would make both smooth halves look alike there)."""
    margin = int(getattr(args, "incr_size", 3))
    if (getattr(args, "fsc_jump", False) and 1 <= edge < len(curve) and curve[edge - 1] > 0.2
            and info.get("mean_pmax", 0.0) > 0.1):
        margin = max(margin, int(round(box / 8)))
    return margin


def final_iteration(resolution, gold: bool, last: int) -> int:
    """The iteration (1-based) whose outputs become the final ones (run_*). refine3d: the one with the best
    gold-standard resolution, the latest of equals (``resolution``: one value per iteration): after its peak a
    map loses a little at unchanged sampling (benchmarks/results/refine3d-monotonic/), and the iteration that
    finds the convergence is one that did not improve; the choice uses no ground truth, only the half sets' FSC.
    Classification (no gold standard): the last iteration."""
    if not gold:
        return last
    if len(resolution) != last:
        raise ValueError(f"{len(resolution)} gold-standard resolutions for {last} iterations")
    r = np.asarray(resolution, dtype=np.float64)
    return int(last - np.argmin(r[::-1]))
