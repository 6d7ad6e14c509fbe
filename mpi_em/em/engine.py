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
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..backend import to_host, xp_of
from ..ctf import ctf_points
from ..fourier import SliceGeometry
from ..geometry import euler_to_matrix
from ..sampling import laplace_offset_variance, translation_grid
from .likelihood import (data_term, log_likelihood_phased, logsumexp, marginalise_translations, offset_log_prior,
                         posterior, shared_operands, shared_parts, shell_of_points, significant_mask, top_k,
                         weighted_translations)
from ..reconstruction import centred_points
from .references import References, angles_from_mats, compose, insert, rotation_2d
from ..timing import NULL_TIMER

# the coarse pass's likelihoods (particles x translations x poses) per GEMM, at most: on CPU ranks 2^24 (64 MB of
# float32; the marginal makes several temporaries that size, in float64 where NumPy promotes), on GPUs 2^31
COARSE_ELEMENTS = {True: 2 ** 24, False: 2 ** 31}


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
    fixed_class: bool = False        # iteration-1 random subsets: each particle sees only its class
    projection_cache: dict = field(default_factory=dict)  # reference set -> projections of the global grid


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

    def as_vector(self) -> np.ndarray:
        return np.concatenate([self.sigma2_sum, self.sigma2_count, self.class_weight,
                               [self.offset_sq, self.offset_w, self.loglike, self.angle_spread, self.offset_var]])

    @classmethod
    def from_vector(cls, v, n_shells, n_classes):
        a, b = n_shells, 2 * n_shells
        return cls(v[:a].copy(), v[a:b].copy(), v[b:b + n_classes].copy(), *(float(x) for x in v[-5:]))

    @classmethod
    def zeros(cls, n_shells, n_classes):
        return cls(np.zeros(n_shells), np.zeros(n_shells), np.zeros(n_classes))


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


def image_shifts_px(plan, sl, pixel_size: float) -> np.ndarray:
    """(n, 2) px, host array: how far each particle's projection is moved in its image, -origin / pixel size.

    RELION's rule (``src/apps/project.cpp``, ``src/reconstructor.cpp``): an image is its projection shifted by
    -rlnOriginXAngst/YAngst; inserting it shifts it back by +origin. The plan holds RELION's origins in Å."""
    return -np.stack([plan["origin_x"][sl], plan["origin_y"][sl]], axis=1) / pixel_size


def current_mats(plan, sl, dim: int, xp):
    if dim == 3:
        return euler_to_matrix(plan["rot"][sl], plan["tilt"][sl], plan["psi"][sl], xp=xp)
    return rotation_2d(xp.asarray(plan["psi"][sl]), xp)


def expectation_batch(X, ctf, inv_sigma2, shells, refs: References, vol_base, prev_mats, prev_class,
                      spec: SearchSpec, geom: SliceGeometry, F_acc, W_acc, stats: Stats, n_shells: int,
                      timer=NULL_TIMER, prior_offsets=None):
    """E-step of one batch (n particles). Returns host arrays of the new poses and weights per particle:
    dict(mats (n,d,d), cls (n,), shift (n,2) change in px, pmax (n,), loglike (n,), nsig (n,)).
    ``timer`` (:class:`mpi_em.timing.PhaseTimer`): phases coarse / fine / insert / stats, GEMM flops.
    ``prior_offsets`` (n, 2) px: the images' current offsets from the centre of the offset prior (the images
    are already re-centred on them): translation t gives the offset o + t, whose prior is Gaussian around 0 of
    width ``spec.offset_sigma`` (RELION's: centred on the prior, not on the previous estimate, so that an
    offset's error is not carried into the next iteration's prior). None: zeros."""
    xp = xp_of(X)
    po = xp.zeros((X.shape[0], 2)) if prior_offsets is None else xp.asarray(prior_offsets, dtype=xp.float64)
    with timer("coarse"):
        coarse = _coarse_pass(X, ctf, inv_sigma2, refs, vol_base, prev_mats, prev_class, spec, geom, timer, po)
    with timer("fine"):
        fine = _fine_pass(X, ctf, inv_sigma2, refs, vol_base, prev_class, spec, geom, coarse, timer, po)
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


def _coarse_pass(X, ctf, inv_sigma2, refs, vol_base, prev_mats, prev_class, spec, geom, timer, po):
    xp = xp_of(X)
    n, m = X.shape
    K = spec.n_classes
    d = spec.dim
    # coarse translations at twice the step (RELION's adaptive oversampling); the fine pass refines them
    T_c = xp.asarray(translation_grid(spec.offset_range, 2.0 * spec.offset_step) + spec.offset_perturb)  # (T, 2)
    prior_t = offset_log_prior(po[:, None, :] + T_c[None], spec.offset_sigma)         # (n, T)
    ph_c = geom.phases(T_c, dtype=X.dtype)                                            # (T, m)
    lcp = spec.log_class_prior if spec.log_class_prior is not None else xp.zeros(K, dtype=xp.float32)
    lcp = xp.asarray(lcp, dtype=xp.float32)

    if spec.global_mats is not None:
        G = spec.global_mats
        C = G.shape[0]
        with timer.detail("coarse.shift"):
            Xt = X[:, None, :] * ph_c[None]                                            # (n, T, m)
        # shared by all particles (1, K*C, d, d), class-major: candidate j is class j // C
        cand_mats = xp.broadcast_to(G[None], (K, C, d, d)).reshape(1, K * C, d, d)
        sel, valid, best_t = None, None, xp.empty((n, 2), dtype=T_c.dtype)
        bases = to_host(vol_base)
        # projections are kept for one reference set at a time: a rank's particles come grouped by reference set
        # (refine3d --folds), so each set is projected once per iteration
        sets = np.unique(bases)
        # particles per GEMM: all of a batch's particles of one reference set, in chunks whose (rows, T, C)
        # likelihoods stay within COARSE_ELEMENTS (CPU ranks: the marginal's temporaries are several such arrays)
        chunk = max(1, COARSE_ELEMENTS[xp is np] // (T_c.shape[0] * K * C))
        groups = [(b, r[s:s + chunk]) for b in sets for r in (np.flatnonzero(bases == b),)
                  for s in range(0, r.size, chunk)]
        ops = None
        for base, rows in groups:
            rows = xp.asarray(rows) if rows.size < n else slice(None)
            # one reference set's projections at a time: the next set's replace the last's (a rank's particles
            # come grouped by set, so a set left behind is not needed again this iteration)
            for k in set(spec.projection_cache) - {int(base)}:
                del spec.projection_cache[k]
                ops = None
            ops = spec.projection_cache.get(int(base))
            if ops is None:  # the shared grid's projections: computed once per iteration and reference set
                with timer.detail("coarse.project"):
                    # in chunks of orientations: a CPU projection holds ~30 bytes per point and corner at once
                    P = xp.empty((K, C, m), dtype=xp.complex64)
                    step = max(1, COARSE_ELEMENTS[xp is np] // (8 * m))
                    for c0 in range(0, C, step):
                        Gc = G[c0:c0 + step]
                        P[:, c0:c0 + step] = refs.project(xp.broadcast_to(Gc[None], (K,) + Gc.shape),
                                                          xp.arange(K)[:, None] + int(base), geom)
                    P = P.reshape(K * C, m)
                    ops = shared_operands(P)
                    del P
                spec.projection_cache[int(base)] = ops
            with timer.detail("coarse.likelihood"):
                cross, norm = shared_parts(Xt[rows], ctf[rows], inv_sigma2, ops)
            timer.add_flops("coarse", 2.0 * cross.shape[0] * T_c.shape[0] * ops[0].shape[0] * 2 * m)
            s, v, t = _select(cross, norm, T_c, prior_t[rows], lcp, prev_class[rows], K, C, spec, timer)
            if sel is None:
                sel = xp.empty((n, s.shape[1]), dtype=s.dtype)
                valid = xp.empty((n, s.shape[1]), dtype=bool)
            sel[rows] = s
            valid[rows] = v
            best_t[rows] = t
            del cross, norm
    else:
        Lm = spec.local_mats
        C = Lm.shape[0]
        cand_mats = xp.broadcast_to(compose(Lm, prev_mats)[:, None], (n, K, C, d, d)).reshape(n, K * C, d, d)
        P = refs.project(cand_mats, (xp.arange(K * C) // C)[None] + vol_base[:, None], geom)  # (n, K*C, m)
        with timer.detail("coarse.likelihood"):
            L = log_likelihood_phased(X, ctf, inv_sigma2, P, ph_c)                     # (n, T, K*C)
        timer.add_flops("coarse", 2.0 * n * T_c.shape[0] * K * C * 2 * m)
        sel, valid, best_t = _select(L, None, T_c, prior_t, lcp, prev_class, K, C, spec, timer)
    if K == 1:  # candidates best first: the fine pass needs only as many as the widest posterior of the batch
        S = max(1, int(valid.sum(axis=1).max()))
        sel, valid = sel[:, :S], valid[:, :S]
    return cand_mats, sel, best_t, lcp, valid


def _select(L, norm, T_c, prior_t, lcp, prev_class, K, C, spec, timer):
    """Coarse log-likelihoods L (n, T, K*C) (less ``norm`` (n, K*C), which does not depend on the translation)
    and log offset priors (n, T) -> the candidates the fine pass refines (n, S), which of them are significant
    (n, S) and each particle's best coarse translation (n, 2).

    Significant (RELION's adaptive oversampling): the candidate's better-ranked selected candidates hold less than
    ``spec.significant`` of the coarse posterior (so the best is always kept and a particle with a broad posterior
    keeps up to ``spec.n_select``); the fine pass gives the others no weight.

    marg = log sum_t exp(L + log prior(t)) - norm + log pi_class; in the first class3d iteration (fixed
    classes) only the particle's own class is allowed. Candidate j (class-major) is of class j // C."""
    xp = xp_of(L)
    with timer.detail("coarse.marginal"):
        marg = marginalise_translations(L, prior_t) + xp.repeat(lcp, C)[None, :]
        if norm is not None:
            marg -= norm
        if spec.fixed_class:
            marg = xp.where((xp.arange(K * C) // C)[None, :] == prev_class[:, None], marg, -xp.inf)
    with timer.detail("coarse.select"):
        sel = select_candidates(marg, K, C, spec.n_select, spec.class_select)             # (n, S)
        at_best = xp.take_along_axis(L, sel[:, None, :1], axis=2)[:, :, 0] + prior_t         # (n, T)
        best_t = T_c[xp.argmax(at_best, axis=1)]                                           # (n, 2)
        m_sel = xp.take_along_axis(marg, sel, axis=1)                                       # (n, S)
        w_sel = xp.exp(m_sel - logsumexp(marg, axis=1)[:, None])
        better = m_sel[:, None, :] > m_sel[:, :, None]                                     # [i, j, k]: k beats j
        valid = (better * w_sel[:, None, :]).sum(axis=2) < spec.significant
        valid[:, 0] = True
    return sel, valid, best_t


def _fine_pass(X, ctf, inv_sigma2, refs, vol_base, prev_class, spec, geom, coarse, timer, po):
    xp = xp_of(X)
    n, m = X.shape
    d = spec.dim
    cand_mats, sel, best_t, lcp, valid = coarse
    S = sel.shape[1]
    Fm = spec.fine_mats
    nf = Fm.shape[0]
    if cand_mats.shape[0] == 1:  # the shared global grid
        s_mats = cand_mats[0][sel]                                                     # (n, S, d, d)
    else:
        s_mats = xp.take_along_axis(cand_mats, sel[:, :, None, None], axis=1)
    s_cls = sel // (cand_mats.shape[1] // spec.n_classes)                           # (n, S): j // C
    f_mats = compose(Fm, s_mats).reshape(n, S * nf, d, d)
    f_cls = xp.repeat(s_cls, nf, axis=1)                                               # (n, S*nf)
    h = spec.offset_step
    dt = xp.asarray([[0.0, 0.0], [-h, 0], [h, 0], [0, -h], [0, h], [-h, -h], [h, -h], [-h, h], [h, h]])
    t_f = best_t[:, None, :] + dt[None]                                                # (n, 9, 2)
    # translation best_t + dt: the image moved by its best coarse translation, then by the 9 shared dt
    Xb = X * geom.phases(best_t, dtype=X.dtype)                                        # (n, m)
    ph_d = geom.phases(dt, dtype=X.dtype)                                              # (9, m)
    with timer.detail("fine.project"):
        P_f = refs.project(f_mats, f_cls + vol_base[:, None], geom)                    # (n, S*nf, m)
    with timer.detail("fine.likelihood"):
        Lf = log_likelihood_phased(Xb, ctf, inv_sigma2, P_f, ph_d)                     # (n, 9, S*nf)
    timer.add_flops("fine", 2.0 * n * 9 * S * nf * 2 * m)
    o_f = po[:, None, :] + t_f                                                         # (n, 9, 2) offsets
    Lf = Lf + offset_log_prior(o_f, spec.offset_sigma)[:, :, None] + lcp[f_cls][:, None, :]
    if spec.fixed_class:
        Lf = xp.where((f_cls == prev_class[:, None])[:, None, :], Lf, -xp.inf)
    if not bool(valid.all()):  # coarse candidates outside the significant set get no weight
        Lf = xp.where(xp.repeat(valid, nf, axis=1)[:, None, :], Lf, -xp.inf)
    w, mx, lse = posterior(Lf)                                                         # (n, 9, S*nf)
    flat_best = xp.argmax(w.reshape(n, -1), axis=1)
    bt, bc = flat_best // (S * nf), flat_best % (S * nf)
    ar = xp.arange(n)
    best_mats = f_mats[ar, bc]
    best_cls = f_cls[ar, bc]
    best_shift = t_f[ar, bt]
    pmax = w.reshape(n, -1).max(axis=1)
    # translational accuracy: the posterior's curvature at the best pose along x (dt 1, 0, 2) and y (3, 0, 4)
    lb = Lf[ar, :, bc].astype(xp.float64)                                              # (n, 9)
    cap = max(spec.offset_range, h) ** 2
    t_var = 0.5 * (laplace_offset_variance(lb[:, 0], lb[:, 1], lb[:, 2], h, cap)
                   + laplace_offset_variance(lb[:, 0], lb[:, 3], lb[:, 4], h, cap))
    return dict(w=w, mx=mx, lse=lse, o_f=o_f, f_mats=f_mats, f_cls=f_cls, Xb=Xb, ph_d=ph_d, P_f=P_f, ctf=ctf,
                best_mats=best_mats, best_cls=best_cls, best_shift=best_shift, pmax=pmax, t_var=t_var)


def _insert_contributions(X, ctf, inv_sigma2, vol_base, spec, geom, F_acc, W_acc, fine, timer=NULL_TIMER):
    xp = xp_of(X)
    d = spec.dim
    w, f_mats, f_cls = fine["w"], fine["f_mats"], fine["f_cls"]
    # ---------------- M-step contributions
    with timer.detail("insert.select"):
        wc = w.sum(axis=1)                                                              # (n, S*nf)
        fine["wc"] = wc
        keep = significant_mask(wc, 0.999)
    with timer.detail("insert.data"):
        wts = (ctf * inv_sigma2[None, :]).astype(xp.float32)
        # sum_t w_{t,c} X_t  for every fine pose, then x CTF / sigma^2
        Xw = weighted_translations(fine["Xb"], w, fine["ph_d"])                        # (n, S*nf, m)
        fine["Xw"] = Xw
        data = Xw * wts[:, None, :]
        weights = wc[:, :, None].astype(xp.float32) * (ctf * wts)[:, None, :]
        ii, cc = xp.nonzero(keep)
        ins_mats, ins_vol = f_mats[ii, cc], f_cls[ii, cc] + vol_base[ii]
        ins_data, ins_w = data[ii, cc], weights[ii, cc]
    # point groups: the job symmetrises the summed accumulators once per iteration (mpi_em.fourier.symmetrise);
    # owned accumulators (em.model.OwnedAccumulators, W_acc None) route the stencil to the planes' owners
    with timer.detail("insert.backproject"):
        if W_acc is None:
            F_acc.insert(ins_vol, ins_mats, ins_data, ins_w, geom)
        else:
            insert(F_acc, W_acc, d, ins_mats, ins_vol, ins_data, ins_w, geom)
    fine["keep"] = keep


def _batch_stats(X, inv_sigma2, shells, spec, geom, stats, n_shells, fine):
    xp = xp_of(X)
    n = X.shape[0]
    K = spec.n_classes
    d = spec.dim
    w, wc, keep, mx, lse = fine["w"], fine["wc"], fine["keep"], fine["mx"], fine["lse"]
    f_mats, f_cls, P_f = fine["f_mats"], fine["f_cls"], fine["P_f"]
    best_mats, best_cls, best_shift, pmax = fine["best_mats"], fine["best_cls"], fine["best_shift"], fine["pmax"]
    ctf = fine["ctf"]
    # noise power: the residual's expectation under the posterior (RELION's wsum_sigma2_noise, the EM update),
    # sum_{t,c} w_tc |X_t - CTF P_c|^2 / 2 = (|X|^2 - 2 CTF Re sum_c conj(Xw_c) P_c + CTF^2 sum_c wc_c |P_c|^2) / 2
    # with Xw_c = sum_t w_tc X_t (the insertion's) and sum w = 1; class weights, offsets, log-likelihood
    Xw = fine["Xw"]
    cross = (Xw.real * P_f.real + Xw.imag * P_f.imag).sum(axis=1)                      # (n, m)
    pp = xp.matmul(wc[:, None, :].astype(xp.float32), (P_f.real ** 2 + P_f.imag ** 2))[:, 0]  # (n, m)
    r2 = 0.5 * ((X.real ** 2 + X.imag ** 2) - 2.0 * ctf * cross + ctf * ctf * pp).astype(xp.float64)
    stats.sigma2_sum += to_host(xp.bincount(shells, weights=r2.sum(axis=0), minlength=n_shells)[:n_shells])
    stats.sigma2_count += to_host(xp.bincount(shells, minlength=n_shells)[:n_shells]) * n
    cls_w = xp.zeros(K, dtype=xp.float64)
    cls_w = cls_w + xp.bincount(f_cls.reshape(-1), weights=wc.reshape(-1).astype(xp.float64), minlength=K)[:K]
    stats.class_weight += to_host(cls_w)
    stats.offset_sq += float((w.sum(axis=2) * (fine["o_f"] ** 2).sum(axis=2)).sum())
    stats.offset_w += float(n)
    stats.offset_var += float(fine["t_var"].sum())
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


def select_candidates(marg, K: int, C: int, n_select: int, class_select: int):
    """Coarse poses that the fine pass refines, per particle: flat indices (n, S) into the (K, C) class-major
    candidates of ``marg`` (n, K*C) (log-likelihood marginalised over translations).

    The ``n_select`` best poses of the most probable class (class marginal over its poses), plus the best pose
    of each of the next ``class_select`` - 1 classes: every competitive class keeps a share of the posterior,
    so class memberships stay soft (as RELION's marginalisation over classes) while the cost grows by one pose
    per class, not by ``n_select`` per class. Classes are disjoint, so no pose is selected twice. With K = 1
    this is the ``n_select`` best poses. The first entry is the best pose of the most probable class."""
    xp = xp_of(marg)
    n = marg.shape[0]
    if K == 1:
        return top_k(marg, n_select)
    m3 = marg.reshape(n, K, C)
    cls_marg = logsumexp(m3, axis=2)                                                  # (n, K)
    Kc = max(1, min(K, class_select))
    top_cls = xp.argsort(-cls_marg, axis=1)[:, :Kc]                                    # (n, Kc)
    S0 = min(n_select, C)
    first = xp.take_along_axis(m3, top_cls[:, :1, None], axis=1)[:, 0]                 # (n, C)
    sel0 = top_k(first, S0) + top_cls[:, :1] * C                                       # (n, S0)
    if Kc == 1:
        return sel0
    rest = xp.take_along_axis(m3, top_cls[:, 1:, None], axis=1)                        # (n, Kc-1, C)
    sel1 = xp.argmax(rest, axis=2) + top_cls[:, 1:] * C                                # (n, Kc-1)
    return xp.concatenate([sel0, sel1], axis=1)


def update_plan_poses(plan, sl, res, dim: int, pixel_size: float) -> None:
    """Write a batch's new poses into the rank's plan (angles in degrees, origins in Å)."""
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
    """Initial noise power per shell: mean |X|^2 / 2 (host arrays: sums and counts)."""
    xp = xp_of(X)
    p = 0.5 * (X.real ** 2 + X.imag ** 2).astype(xp.float64)
    s = xp.bincount(shells, weights=p.sum(axis=0), minlength=n_shells)[:n_shells]
    c = xp.bincount(shells, minlength=n_shells)[:n_shells] * X.shape[0]
    return to_host(s), to_host(c)


def inverse_sigma2_points(sigma2, shells, xp):
    s = xp.asarray(sigma2, dtype=xp.float64)[shells]
    return xp.where(s > 0, 1.0 / xp.where(s > 0, s, 1.0), 0.0).astype(xp.float32)


__all__ = ["SearchSpec", "Stats", "prepare_batch", "current_mats", "image_shifts_px", "expectation_batch",
           "update_plan_poses", "sigma2_from_images", "inverse_sigma2_points", "shell_of_points"]
