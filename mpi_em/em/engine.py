"""Expectation-maximisation over a rank's particles: one implementation for class2d, class3d and refine3d.

E-step for a batch (all arrays on the rank's array module):
  1. coarse pass: log-likelihood over (translation grid) x (K classes x pose set) — a shared global grid
     (one GEMM) or per-particle local poses around the previous pose (one GEMM against the shared translations);
  2. the coarse poses inside 99.9% of the coarse posterior survive, at most ``n_select`` (significant weights);
     the fine pass oversamples each of them (finer rotations, translations at the full step around the best coarse
     one, whose grid has twice the step) and gives the posterior weights;
  3. M-step contributions: for every significant fine pose, sum_t w X_t, times CTF / sigma^2, is inserted with
     weight w CTF^2 / sigma^2 into the accumulators of its reference; noise power at the best pose, class
     weights and offset moments are summed for the model update.
The caller reduces the accumulators and sums over ranks and reconstructs (:mod:`mpi_em.em.model`).
The pose search (coarse and fine passes) is :mod:`mpi_em.em.search`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..backend import to_host, xp_of
from ..ctf import ctf_points
from ..fourier import SliceGeometry
from ..geometry import euler_to_matrix
from .likelihood import data_term, shell_of_points, significant_mask, weighted_phases
from ..masks import particle_masked_images
from ..reconstruction import centred_points
from .references import References, angles_from_mats, insert, rotation_2d
from .search import COARSE_ELEMENTS, FinePass, _coarse_pass, _fine_pass, _select, select_candidates  # noqa: F401
from ..timing import NULL_TIMER


@dataclass
class SearchSpec:
    """What one E-step searches."""

    dim: int
    n_classes: int
    global_mats: object | None       # (C, d, d) shared grid, or None for local searches
    local_mats: object | None        # (L, d, d) small rotations around the previous pose (local searches)
    fine_mats: object                # (F, d, d) oversampling of a coarse cell
    offset_range: float              # px
    offset_step: float               # px
    offset_sigma: float              # px, width of the Gaussian prior on the offset (centred on 0)
    offset_perturb: float = 0.0      # px added to both axes of every translation (the grid's random perturbation)
    n_select: int = 4                # at most this many coarse poses per particle go to the fine pass
    significant: float = 0.999       # ... those the best of which hold less than this share of the coarse posterior
    class_select: int = 10           # classes per particle whose best coarse pose(s) the fine pass also refines
    log_class_prior: object | None = None   # (K,) log pi_k
    direction_log_prior: object | None = None  # (K, D) log prior of each class and direction of the global grid
    #                                  (RELION's pdf_direction, whose sum over directions is the class prior), the
    #                                  grid's poses direction-major with n_psi in-plane angles each; None:
    #                                  log_class_prior for every pose
    n_psi: int = 1                   # in-plane angles per direction of the global grid (direction_log_prior)
    fixed_class: bool = False        # iteration-1 random subsets: each particle sees only its class
    projection_cache: dict = field(default_factory=dict)  # reference set -> projections of the global grid
    local_log_prior: object | None = None  # (L,) float32 log prior of each local rotation (None: uniform)
    local_sigma_deg: float = 0.0     # > 0: Gaussian prior on the angle from the previous pose (local searches)
    grid_chunk: int = 0              # > 0: the global grid projected this many orientations per class at a time,
    #                                  per batch, and not kept (the memory model's choice where the whole grid's
    #                                  projections would not fit); 0: projected once per iteration and kept


@dataclass
class Stats:
    """Sums over a rank's particles for the model update (then summed over ranks)."""

    sigma2_sum: np.ndarray
    sigma2_count: np.ndarray
    class_weight: np.ndarray
    offset_sq: float = 0.0
    offset_w: float = 0.0
    loglike: float = 0.0
    angle_spread: float = 0.0   # sum over particles of the posterior rms angle about the best pose (deg)
    offset_var: float = 0.0     # sum over particles of the posterior variance of an offset per axis (px^2)
    direction_weight: np.ndarray | None = None  # (K * D,) posterior weight per class and direction of the global
    #                                             grid, class-major (SearchSpec.direction_log_prior); None: not kept

    def as_vector(self) -> np.ndarray:
        dw = [] if self.direction_weight is None else self.direction_weight
        return np.concatenate([self.sigma2_sum, self.sigma2_count, self.class_weight, dw,
                               [self.offset_sq, self.offset_w, self.loglike, self.angle_spread, self.offset_var]])

    @classmethod
    def from_vector(cls, v, n_shells, n_classes, n_directions: int = 0):
        a, b, c = n_shells, 2 * n_shells, 2 * n_shells + n_classes
        dw = v[c:c + n_classes * n_directions].copy() if n_directions else None
        return cls(v[:a].copy(), v[a:b].copy(), v[b:c].copy(), *(float(x) for x in v[-5:]), direction_weight=dw)

    @classmethod
    def zeros(cls, n_shells, n_classes, n_directions: int = 0):
        """``n_directions`` > 0: the class-and-direction weights are kept too (K x n_directions)."""
        return cls(np.zeros(n_shells), np.zeros(n_shells), np.zeros(n_classes),
                   direction_weight=np.zeros(n_classes * n_directions) if n_directions else None)


def prepare_batch(images, plan, sl, geom: SliceGeometry, box: int, pixel_size: float, use_ctf: bool = True,
                  intact_first_peak: bool = False):
    """In-ball FFT of the images re-centred on their current offsets, and their CTFs: (n, m) each
    (``intact_first_peak``: CTF = 1 up to its first peak, RELION's --ctf_intact_first_peak)."""
    off = image_shifts_px(plan, sl, pixel_size)
    c = None
    if use_ctf:
        c = ctf_points(geom, pixel_size, plan["defocus_u"][sl], plan["defocus_v"][sl], plan["defocus_angle"][sl],
                       plan["voltage"][sl], plan["cs"][sl], plan["amp_contrast"][sl], plan["phase_shift"][sl],
                       plan["bfactor"][sl], intact_first_peak=intact_first_peak, scale=plan["ctf_scale"][sl])
    return centred_points(images, off, geom, c)


def masked_points(images, plan, sl, geom: SliceGeometry, pixel_size: float, radius_px: float):
    """RELION's --zero_mask images: the (n, N, N) ``images`` masked about their particles (a circle of
    ``radius_px``, RELION's particle diameter / 2, with its 5-px raised-cosine edge,
    :func:`mpi_em.masks.particle_masked_images`), then as :func:`prepare_batch`'s: the in-ball FFT re-centred on
    the particles' offsets, (n, m)."""
    off = image_shifts_px(plan, sl, pixel_size)
    masked = particle_masked_images(geom.xp.asarray(images), off, radius_px, ZERO_MASK_EDGE_PX)
    return centred_points(masked, off, geom)[0]


#: RELION's width_mask_edge (ml_optimiser, 5 px): the raised-cosine edge of the particles' mask (--zero-mask)
ZERO_MASK_EDGE_PX = 5.0


def image_shifts_px(plan, sl, pixel_size: float) -> np.ndarray:
    """(n, 2) px, host array: how far each particle's projection is moved in its image, -origin / pixel size.

    RELION's rule (``src/apps/project.cpp``, ``src/reconstructor.cpp``): an image is its projection shifted by
    -rlnOriginXAngst/YAngst; inserting it shifts it back by +origin. The plan holds RELION's origins in Å."""
    return -np.stack([plan["origin_x"][sl], plan["origin_y"][sl]], axis=1) / pixel_size


def current_mats(plan, sl, dim: int, xp):
    """The particles' current rotations, (n, 3, 3) from (rot, tilt, psi) in 3D, (n, 2, 2) from psi in 2D."""
    if dim == 3:
        return euler_to_matrix(plan["rot"][sl], plan["tilt"][sl], plan["psi"][sl], xp=xp)
    return rotation_2d(xp.asarray(plan["psi"][sl]), xp)


def expectation_batch(X, ctf, inv_sigma2, shells, refs: References, vol_base, prev_mats, prev_class,
                      spec: SearchSpec, geom: SliceGeometry, F_acc, W_acc, stats: Stats, n_shells: int,
                      timer=NULL_TIMER, prior_offsets=None, X_insert=None):
    """E-step of one batch (n particles). Returns host arrays of the new poses and weights per particle:
    dict(mats (n,d,d), cls (n,), shift (n,2) change in px, pmax (n,), loglike (n,), nsig (n,)).
    Shapes (m in-ball points of ``geom``, d = ``spec.dim``): ``X`` (n, m) complex images re-centred on their
    offsets and ``ctf`` (n, m) (:func:`prepare_batch`), ``inv_sigma2`` (m,) float32 and ``shells`` (m,) int
    (:func:`inverse_sigma2_points`, :func:`shell_of_points`), ``vol_base`` (n,) the first volume of each particle's
    reference set, ``prev_mats`` (n, d, d), ``prev_class`` (n,) 0-based; ``F_acc``, ``W_acc`` the accumulators
    (V, Np, Np, Np//2+1) in 3D, (V, Np, Np//2+1) in 2D, or (:class:`mpi_em.em.model.OwnedAccumulators`, None), or
    (:class:`mpi_em.em.model.CroppedAccumulators`, None).
    ``timer`` (:class:`mpi_em.timing.PhaseTimer`): phases coarse / fine / insert / stats, GEMM flops.
    ``prior_offsets`` (n, 2) px: the images' current offsets from the centre of the offset prior (the images
    are already re-centred on them): translation t gives the offset o + t, whose prior is Gaussian around 0 of
    width ``spec.offset_sigma`` (RELION's: centred on the prior, not on the previous estimate, so that an
    offset's error is not carried into the next iteration's prior). None: zeros.
    ``X_insert`` (n, m): the images to insert where they are not ``X``, which the poses, the noise power and the
    log-likelihood are then taken from (RELION's --zero_mask: ``X`` the images masked about their particles,
    :func:`masked_points`, ``X_insert`` the unmasked ones, RELION's Fimg and Fimg_nomask). None: ``X``."""
    xp = xp_of(X)
    po = xp.zeros((X.shape[0], 2)) if prior_offsets is None else xp.asarray(prior_offsets, dtype=xp.float64)
    with timer("coarse"):
        coarse = _coarse_pass(X, ctf, inv_sigma2, refs, vol_base, prev_mats, prev_class, spec, geom, timer, po)
    with timer("fine"):
        fine = _fine_pass(X, ctf, inv_sigma2, refs, vol_base, prev_class, spec, geom, coarse, timer, po,
                          prev_mats=prev_mats, X_insert=X_insert)
    with timer("insert"):
        _insert_contributions(X, ctf, inv_sigma2, vol_base, spec, geom, F_acc, W_acc, fine, timer)
    with timer("stats"):
        return _batch_stats(X, inv_sigma2, shells, spec, geom, stats, n_shells, fine)


def end_e_step(refs: References, spec: SearchSpec, xp) -> None:
    """Give back what only the E-step uses: the references' Fourier volumes (the next iteration makes new ones)
    and the global grid's projections, then the device's pooled blocks and FFT plans
    (:func:`mpi_em.memory.release_device_memory`): the M-step and the next references do not hold them."""
    from ..memory import release_device_memory

    spec.projection_cache.clear()
    refs.F = None
    if getattr(refs, "centred", None) is not None:  # a projector layout of the same volumes, where one is kept
        refs.centred = None
    release_device_memory(xp)


def _insert_contributions(X, ctf, inv_sigma2, vol_base, spec, geom, F_acc, W_acc, fine: FinePass,
                          timer=NULL_TIMER) -> None:
    xp = xp_of(X)
    d = spec.dim
    w, f_mats, f_cls = fine.w, fine.f_mats, fine.f_cls
    # ---------------- M-step contributions
    with timer.detail("insert.select"):
        wc = w.sum(axis=1)                                                              # (n, S*nf)
        fine.wc = wc
        keep = significant_mask(wc, 0.999)
    with timer.detail("insert.data"):
        wts = (ctf * inv_sigma2[None, :]).astype(xp.float32)
        # sum_t w_{t,c} X_t  for every fine pose, then x CTF / sigma^2 (Q: sum_t w_{t,c} of the phases of t)
        Q = weighted_phases(w, fine.ph_d)                                           # (n, S*nf, m)
        if fine.Xb_insert is None:
            Q *= fine.Xb[:, None, :]
            fine.Xw = Q
            data = Q * wts[:, None, :]
        else:  # the unmasked images inserted; the masked ones' sums for the noise power (statistics)
            data = Q * fine.Xb_insert[:, None, :]
            data *= wts[:, None, :]
            fine.Xb_insert = None
            Q *= fine.Xb[:, None, :]
            fine.Xw = Q
        del Q
        weights = wc[:, :, None].astype(xp.float32) * (ctf * wts)[:, None, :]
        ii, cc = xp.nonzero(keep)
        ins_mats, ins_vol = f_mats[ii, cc], f_cls[ii, cc] + vol_base[ii]
        ins_data, ins_w = data[ii, cc], weights[ii, cc]
    # point groups: the job symmetrises the summed accumulators once per iteration (mpi_em.fourier.symmetrise);
    # owned accumulators (em.model.OwnedAccumulators, W_acc None) route the stencil to the planes' owners; cropped
    # ones (em.model.CroppedAccumulators, W_acc None) insert into the cube the current size reaches
    with timer.detail("insert.backproject"):
        if W_acc is None:
            F_acc.insert(ins_vol, ins_mats, ins_data, ins_w, geom)
        else:
            insert(F_acc, W_acc, d, ins_mats, ins_vol, ins_data, ins_w, geom)
    fine.keep = keep


def _batch_stats(X, inv_sigma2, shells, spec, geom, stats, n_shells, fine: FinePass):
    xp = xp_of(X)
    n = X.shape[0]
    K = spec.n_classes
    d = spec.dim
    w, wc, keep, mx, lse = fine.w, fine.wc, fine.keep, fine.mx, fine.lse
    f_mats, f_cls, P_f = fine.f_mats, fine.f_cls, fine.P_f
    best_mats, best_cls, best_shift, pmax = fine.best_mats, fine.best_cls, fine.best_shift, fine.pmax
    ctf = fine.ctf
    # noise power: the residual's expectation under the posterior (RELION's wsum_sigma2_noise, the EM update),
    # sum_{t,c} w_tc |X_t - CTF P_c|^2 / 2 = (|X|^2 - 2 CTF Re sum_c conj(Xw_c) P_c + CTF^2 sum_c wc_c |P_c|^2) / 2
    # with Xw_c = sum_t w_tc X_t (the insertion's) and sum w = 1; class weights, offsets, log-likelihood
    Xw = fine.Xw
    cross = (Xw.real * P_f.real + Xw.imag * P_f.imag).sum(axis=1)                      # (n, m)
    pp = xp.matmul(wc[:, None, :].astype(xp.float32), (P_f.real ** 2 + P_f.imag ** 2))[:, 0]  # (n, m)
    r2 = 0.5 * ((X.real ** 2 + X.imag ** 2) - 2.0 * ctf * cross + ctf * ctf * pp).astype(xp.float64)
    stats.sigma2_sum += to_host(xp.bincount(shells, weights=r2.sum(axis=0), minlength=n_shells)[:n_shells])
    stats.sigma2_count += to_host(xp.bincount(shells, minlength=n_shells)[:n_shells]) * n
    cls_w = xp.zeros(K, dtype=xp.float64)
    cls_w = cls_w + xp.bincount(f_cls.reshape(-1), weights=wc.reshape(-1).astype(xp.float64), minlength=K)[:K]
    stats.class_weight += to_host(cls_w)
    if stats.direction_weight is not None:  # RELION's wsum pdf_direction: each fine pose's weight to its coarse
        #                                     pose's class and direction (the grid is class-major, direction-major)
        C = spec.global_mats.shape[0]
        D = C // spec.n_psi
        cd = (fine.f_cand // C) * D + (fine.f_cand % C) // spec.n_psi
        stats.direction_weight += to_host(xp.bincount(cd.reshape(-1), weights=wc.reshape(-1).astype(xp.float64),
                                                      minlength=K * D)[:K * D])
    stats.offset_sq += float((w.sum(axis=2) * (fine.o_f ** 2).sum(axis=2)).sum())
    stats.offset_w += float(n)
    stats.offset_var += float(fine.t_var.sum())
    # angular accuracy: posterior rms angle of the fine poses about the best one
    tr = xp.einsum("ncij,nij->nc", f_mats, best_mats)
    if d == 3:
        ang = xp.arccos(xp.clip((tr - 1.0) / 2.0, -1.0, 1.0))
    else:
        ang = xp.arccos(xp.clip(tr / 2.0, -1.0, 1.0))
    stats.angle_spread += float(xp.sqrt((wc * ang ** 2).sum(axis=1)).sum() * 180.0 / np.pi)
    ll = mx + lse + data_term(X, inv_sigma2)
    stats.loglike += float(ll.sum())
    return {"mats": to_host(best_mats), "cls": to_host(best_cls), "shift": to_host(best_shift),
            "pmax": to_host(pmax), "loglike": to_host(ll), "nsig": to_host(keep.sum(axis=1))}


def update_plan_poses(plan, sl, res, dim: int, pixel_size: float) -> None:
    """Write a batch's new poses into the rank's plan (angles in degrees, origins in Å): ``res`` of
    :func:`expectation_batch` for the particles ``sl`` of the plan, its shifts in px (``pixel_size`` Å/px)."""
    rot, tilt, psi = angles_from_mats(res["mats"], dim)
    if dim == 3:
        plan["rot"][sl], plan["tilt"][sl] = rot, tilt
    plan["psi"][sl] = psi
    # res["shift"]: the change of the image shift (px); RELION's origin is minus the image shift
    plan["origin_x"][sl] = plan["origin_x"][sl] - res["shift"][:, 0] * pixel_size
    plan["origin_y"][sl] = plan["origin_y"][sl] - res["shift"][:, 1] * pixel_size
    plan["class_number"][sl] = res["cls"] + 1
    plan["pmax"][sl] = res["pmax"]
    plan["loglike"][sl] = res["loglike"]
    plan["nsig"][sl] = res["nsig"]


def sigma2_from_images(X, shells, n_shells):
    """Initial noise power per shell: mean |X|^2 / 2 of ``X`` (n, m) at the points of ``shells`` (m,) -> host sums
    and counts, (n_shells,) each."""
    xp = xp_of(X)
    p = 0.5 * (X.real ** 2 + X.imag ** 2).astype(xp.float64)
    s = xp.bincount(shells, weights=p.sum(axis=0), minlength=n_shells)[:n_shells]
    c = xp.bincount(shells, minlength=n_shells)[:n_shells] * X.shape[0]
    return to_host(s), to_host(c)


def inverse_sigma2_points(sigma2, shells, xp):
    """1 / sigma^2 (n_shells,) at the in-ball points of ``shells`` (m,) -> (m,) float32, 0 where sigma^2 is 0."""
    s = xp.asarray(sigma2, dtype=xp.float64)[shells]
    return xp.where(s > 0, 1.0 / xp.where(s > 0, s, 1.0), 0.0).astype(xp.float32)


__all__ = ["SearchSpec", "Stats", "prepare_batch", "masked_points", "current_mats", "image_shifts_px",
           "expectation_batch", "update_plan_poses", "sigma2_from_images", "inverse_sigma2_points", "shell_of_points"]
