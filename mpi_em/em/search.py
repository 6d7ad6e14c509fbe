"""The E-step's pose search for a batch: the coarse pass (a shared global grid, or local poses around the previous
pose, against translations at twice the step), the selection of the significant coarse poses, and the fine pass
that oversamples them and gives the posterior (:class:`FinePass`). Shapes: n particles, m in-ball points, K classes,
C coarse poses per class, S selected coarse poses, nf fine rotations per coarse pose, J = S * nf fine poses, 9 fine
translations per particle; d = 2 or 3 (class2d or 3D)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backend import to_host, xp_of
from ..sampling import laplace_offset_variance, translation_grid
from .likelihood import (fill_shared_operands, log_likelihood_phased, logsumexp, marginalise_translations,
                         offset_log_prior, posterior, shared_parts, top_k)
from .references import compose

# the coarse pass's likelihoods (particles x translations x poses) per GEMM, at most: on CPU ranks 2^24 (64 MB of
# float32; the marginal makes several temporaries that size, in float64 where NumPy promotes), on GPUs 2^31
COARSE_ELEMENTS = {True: 2 ** 24, False: 2 ** 31}
# the shared grid's orientations projected at a time, as points (orientations x m) per class: on CPU ranks 2^21
# (a NumPy projection holds ~100-175 bytes per point at once), on GPUs 2^25 (256 MiB of complex64 per class)
PROJECT_POINTS = {True: 2 ** 21, False: 2 ** 25}

@dataclass
class FinePass:
    """The fine pass's posterior over (9 translations) x (J fine poses) for n particles, and what the insertion and
    the statistics read from it. ``wc``, ``Xw`` and ``keep`` are filled in by the insertion
    (:func:`mpi_em.em.engine._insert_contributions`), which the statistics follow."""

    w: object            # (n, 9, J) posterior weights
    mx: object           # (n,) largest log posterior term
    lse: object          # (n,) log sum of exp(log posterior - mx)
    o_f: object          # (n, 9, 2) offsets from the prior's centre of the fine translations, px
    f_mats: object       # (n, J, d, d) fine poses
    f_cls: object        # (n, J) class of each fine pose
    f_cand: object       # (n, J) the coarse candidate (class-major index) each fine pose oversamples
    Xb: object           # (n, m) images moved by their best coarse translation
    ph_d: object         # (9, m) phases of the 9 fine translation steps
    P_f: object          # (n, J, m) projections at the fine poses
    ctf: object          # (n, m)
    best_mats: object    # (n, d, d) best fine pose
    best_cls: object     # (n,)
    best_shift: object   # (n, 2) best translation, px
    pmax: object         # (n,) largest posterior weight
    t_var: object        # (n,) posterior variance of an offset per axis, px^2
    wc: object = None    # (n, J) weights summed over the translations (insertion)
    Xw: object = None    # (n, J, m) sum_t w X_t per fine pose (insertion)
    Xb_insert: object = None  # (n, m) the images inserted, moved as Xb, where they differ from those searched
    #                           (--zero-mask: the unmasked images); None: Xb
    keep: object = None  # (n, J) bool, the fine poses inserted (insertion)


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
    if spec.global_mats is not None and spec.direction_log_prior is not None:
        # RELION's pdf_direction: a prior per class and direction, each direction's in-plane angles alike
        lpc = xp.repeat(xp.asarray(spec.direction_log_prior, dtype=xp.float32), spec.n_psi, axis=1).reshape(-1)
    else:
        lpc = xp.repeat(lcp, spec.global_mats.shape[0] if spec.global_mats is not None else spec.local_mats.shape[0])

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
        chunked = 0 < spec.grid_chunk < C
        for base, rows in groups:
            rows = xp.asarray(rows) if rows.size < n else slice(None)
            if chunked:
                cross, norm = _chunked_parts(Xt[rows], ctf[rows], inv_sigma2, refs, G, K, int(base), spec.grid_chunk,
                                             geom, timer)
                timer.add_flops("coarse", 2.0 * cross.shape[0] * T_c.shape[0] * K * C * 2 * m)
                s, v, t = _select(cross, norm, T_c, prior_t[rows], lpc, prev_class[rows], K, C, spec, timer)
                if sel is None:
                    sel = xp.empty((n, s.shape[1]), dtype=s.dtype)
                    valid = xp.empty((n, s.shape[1]), dtype=bool)
                sel[rows], valid[rows], best_t[rows] = s, v, t
                del cross, norm
                continue
            # one reference set's projections at a time: the next set's replace the last's (a rank's particles
            # come grouped by set, so a set left behind is not needed again this iteration)
            for k in set(spec.projection_cache) - {int(base)}:
                del spec.projection_cache[k]
                ops = None
            ops = spec.projection_cache.get(int(base))
            if ops is None:  # the shared grid's projections: computed once per iteration and reference set
                with timer.detail("coarse.project"):
                    ops = grid_operands(refs, G, K, int(base), geom)
                spec.projection_cache[int(base)] = ops
            with timer.detail("coarse.likelihood"):
                cross, norm = shared_parts(Xt[rows], ctf[rows], inv_sigma2, ops)
            timer.add_flops("coarse", 2.0 * cross.shape[0] * T_c.shape[0] * ops[0].shape[0] * 2 * m)
            s, v, t = _select(cross, norm, T_c, prior_t[rows], lpc, prev_class[rows], K, C, spec, timer)
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
        if spec.local_log_prior is not None:  # the Gaussian prior around the previous pose (RELION's)
            L += xp.tile(xp.asarray(spec.local_log_prior, dtype=L.dtype), K)[None, None, :]
        timer.add_flops("coarse", 2.0 * n * T_c.shape[0] * K * C * 2 * m)
        sel, valid, best_t = _select(L, None, T_c, prior_t, lpc, prev_class, K, C, spec, timer)
    if K == 1:  # candidates best first: the fine pass needs only as many as the widest posterior of the batch
        S = max(1, int(valid.sum(axis=1).max()))
        sel, valid = sel[:, :S], valid[:, :S]
    return cand_mats, sel, best_t, lpc, valid


def grid_operands(refs, G, K: int, base: int, geom):
    """The GEMM operands (:func:`shared_operands`) of the whole grid G (C, d, d) for every class of reference set
    ``base``: B (K C, 2m) and |P|^2 (K C, m), float32, class-major. Written a chunk of orientations at a time
    (PROJECT_POINTS points per class): 12 K C m bytes and one chunk's projections (a CPU projection holds ~100-175
    bytes per point at once: memory.model.PROJECT_BYTES_PER_POINT), never the grid's complex projections beside
    its operands."""
    xp = geom.xp
    C, m = G.shape[0], geom.m
    B = xp.empty((K, C, 2 * m), dtype=xp.float32)
    P2 = xp.empty((K, C, m), dtype=xp.float32)
    step = max(1, PROJECT_POINTS[xp is np] // m)
    for c0 in range(0, C, step):
        Gc = G[c0:c0 + step]
        P = refs.project(xp.broadcast_to(Gc[None], (K,) + Gc.shape), xp.arange(K)[:, None] + base, geom)
        fill_shared_operands(P, B[:, c0:c0 + step], P2[:, c0:c0 + step])
        del P
    return B.reshape(K * C, 2 * m), P2.reshape(K * C, m)


def _chunked_parts(Xt, ctf, inv_sigma2, refs, G, K: int, base: int, chunk: int, geom, timer):
    """:func:`shared_parts` over the whole grid G (C, 3, 3) for every class, the grid projected ``chunk``
    orientations per class at a time and given back after its GEMMs: the coarse pass's memory without the
    grid's projections (12 K C m bytes) -> cross (rows, T, K C), norm (rows, K C), class-major as the cached
    path's. Costs one projection of the grid per batch instead of per iteration."""
    xp = xp_of(Xt)
    rows, T, m = Xt.shape
    C = G.shape[0]
    cross = xp.empty((rows, T, K, C), dtype=xp.float32)
    norm = xp.empty((rows, K, C), dtype=xp.float32)
    for c0 in range(0, C, chunk):
        Gc = G[c0:c0 + chunk]
        with timer.detail("coarse.project"):
            ops = grid_operands(refs, Gc, K, base, geom)
        with timer.detail("coarse.likelihood"):
            c, nm = shared_parts(Xt, ctf, inv_sigma2, ops)
        cross[..., c0:c0 + Gc.shape[0]] = c.reshape(rows, T, K, -1)
        norm[..., c0:c0 + Gc.shape[0]] = nm.reshape(rows, K, -1)
        del ops, c, nm
    return cross.reshape(rows, T, K * C), norm.reshape(rows, K * C)


def _select(L, norm, T_c, prior_t, lpc, prev_class, K, C, spec, timer):
    """Coarse log-likelihoods L (n, T, K*C) (less ``norm`` (n, K*C), which does not depend on the translation)
    and log offset priors (n, T) -> the candidates the fine pass refines (n, S), which of them are significant
    (n, S) and each particle's best coarse translation (n, 2).

    Significant (RELION's adaptive oversampling): the candidate's better-ranked selected candidates hold less than
    ``spec.significant`` of the coarse posterior (so the best is always kept and a particle with a broad posterior
    keeps up to ``spec.n_select``); the fine pass gives the others no weight.

    marg = log sum_t exp(L + log prior(t)) - norm + log prior of the candidate (``lpc`` (K*C,): its class's, or its
    class's and direction's); in the first class3d iteration (fixed classes) only the particle's own class is
    allowed. Candidate j (class-major) is of class j // C."""
    xp = xp_of(L)
    with timer.detail("coarse.marginal"):
        marg = marginalise_translations(L, prior_t) + xp.asarray(lpc, dtype=xp.float32)[None, :]
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


def angle_log_prior(A, prev, sigma_deg: float):
    """log of a Gaussian prior of width ``sigma_deg`` on the rotation angle between poses A (n, S, d, d) and the
    previous poses ``prev`` (n, d, d) -> (n, S) float32 (RELION's local-search prior on the angular distance)."""
    xp = xp_of(A)
    d = A.shape[-1]
    tr = xp.einsum("nsij,nij->ns", A.astype(xp.float64, copy=False), prev.astype(xp.float64, copy=False))
    c = (tr - 1.0) / 2.0 if d == 3 else tr / 2.0
    theta = xp.degrees(xp.arccos(xp.clip(c, -1.0, 1.0)))
    return (-0.5 * (theta / sigma_deg) ** 2).astype(xp.float32)


def _fine_pass(X, ctf, inv_sigma2, refs, vol_base, prev_class, spec, geom, coarse, timer, po,
               prev_mats=None, X_insert=None) -> FinePass:
    xp = xp_of(X)
    n, m = X.shape
    d = spec.dim
    cand_mats, sel, best_t, lpc, valid = coarse
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
    f_cand = xp.repeat(sel, nf, axis=1)                                                # (n, S*nf)
    h = spec.offset_step
    dt = xp.asarray([[0.0, 0.0], [-h, 0], [h, 0], [0, -h], [0, h], [-h, -h], [h, -h], [-h, h], [h, h]])
    t_f = best_t[:, None, :] + dt[None]                                                # (n, 9, 2)
    # translation best_t + dt: the image moved by its best coarse translation, then by the 9 shared dt
    ph_b = geom.phases(best_t, dtype=X.dtype)                                          # (n, m)
    Xb = X * ph_b
    Xb_insert = None if X_insert is None else X_insert * ph_b
    del ph_b
    ph_d = geom.phases(dt, dtype=X.dtype)                                              # (9, m)
    with timer.detail("fine.project"):
        P_f = refs.project(f_mats, f_cls + vol_base[:, None], geom)                    # (n, S*nf, m)
    with timer.detail("fine.likelihood"):
        Lf = log_likelihood_phased(Xb, ctf, inv_sigma2, P_f, ph_d)                     # (n, 9, S*nf)
    timer.add_flops("fine", 2.0 * n * 9 * S * nf * 2 * m)
    o_f = po[:, None, :] + t_f                                                         # (n, 9, 2) offsets
    Lf = Lf + offset_log_prior(o_f, spec.offset_sigma)[:, :, None] + lpc[f_cand][:, None, :]
    if spec.local_mats is not None and spec.local_sigma_deg > 0 and prev_mats is not None:
        Lf = Lf + angle_log_prior(f_mats, prev_mats, spec.local_sigma_deg)[:, None, :]
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
    return FinePass(w=w, mx=mx, lse=lse, o_f=o_f, f_mats=f_mats, f_cls=f_cls, f_cand=f_cand, Xb=Xb, ph_d=ph_d,
                    P_f=P_f, ctf=ctf, best_mats=best_mats, best_cls=best_cls, best_shift=best_shift, pmax=pmax,
                    t_var=t_var, Xb_insert=Xb_insert)


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
