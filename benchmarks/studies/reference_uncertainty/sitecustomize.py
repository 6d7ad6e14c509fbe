"""Study (not part of mpi_em): the E-step's likelihood with the references' own uncertainty added to the noise,
sigma'^2 = sigma^2 + ALPHA ctf^2 / (mean W + 1 / tau^2) per shell (the posterior variance of the Wiener-filtered
reference, from the last M-step's tau^2 and mean weights, the half sets' mean), in the coarse and fine passes only;
the insertion and the noise statistics see the data as they are. The likelihood with per-point noise is obtained by
scaling the images and CTFs by sqrt(sigma^2 / sigma'^2), which leaves X CTF / sigma^2 and CTF^2 / sigma^2 as they
would be with sigma'^2.

A sitecustomize module: it patches mpi_em.em.steps in every Python process that finds this folder first on its
path, when MPI_EM_REFUNC=ALPHA is set (nothing otherwise):

    PYTHONPATH=benchmarks/studies/reference_uncertainty MPI_EM_REFUNC=1 \
        bash benchmarks/refine3d_iterations.sh OUT 48 1000 0.25 2.67 9 3

Results: benchmarks/results/refine3d-monotonic/README.md ("The references' uncertainty in the likelihood")."""
import os

_alpha = os.environ.get("MPI_EM_REFUNC")
if _alpha:
    import numpy as np
    import mpi_em.em.engine as E
    import mpi_em.em.steps as S

    ALPHA = float(_alpha)
    _state = {}
    _orig_max = S.maximisation

    def maximisation(job, it, acc, stats, timer):
        maps, info = _orig_max(job, it, acc, stats, timer)
        t2 = np.atleast_2d(np.asarray(info.get("tau2"), dtype=np.float64))
        mw = np.atleast_2d(np.asarray(info.get("mean_w"), dtype=np.float64))
        with np.errstate(divide="ignore"):
            u = np.where(t2 > 0, 1.0 / (mw + 1.0 / np.where(t2 > 0, t2, 1.0)), 0.0)
        _state["u"] = u.mean(axis=0)  # per shell, the halves' mean
        return maps, info

    def expectation_batch(X, ctf, inv_sigma2, shells, refs, vol_base, prev_mats, prev_class, spec, geom, F_acc,
                          W_acc, stats, n_shells, timer=None, prior_offsets=None):
        from mpi_em.timing import NULL_TIMER
        timer = NULL_TIMER if timer is None else timer
        xp = E.xp_of(X)
        po = xp.zeros((X.shape[0], 2)) if prior_offsets is None else xp.asarray(prior_offsets, dtype=xp.float64)
        u = _state.get("u")
        if u is None:
            Xs, cs = X, ctf
        else:
            uu = xp.asarray(u[np.minimum(E.to_host(shells), len(u) - 1)], dtype=xp.float64)
            s2 = 1.0 / xp.maximum(inv_sigma2.astype(xp.float64), 1e-30)
            a = xp.sqrt(s2[None, :] / (s2[None, :] + ALPHA * ctf.astype(xp.float64) ** 2 * uu[None, :]))
            a = xp.where(inv_sigma2[None, :] > 0, a, 1.0)
            Xs, cs = (X * a).astype(X.dtype), (ctf * a).astype(ctf.dtype)
        with timer("coarse"):
            coarse = E._coarse_pass(Xs, cs, inv_sigma2, refs, vol_base, prev_mats, prev_class, spec, geom, timer, po)
        with timer("fine"):
            fine = E._fine_pass(Xs, cs, inv_sigma2, refs, vol_base, prev_class, spec, geom, coarse, timer, po,
                                prev_mats=prev_mats)
        if u is not None:  # insertion and noise statistics with the data as they are
            fine.Xb = X * geom.phases(coarse[2], dtype=X.dtype)
            fine.ctf = ctf
        with timer("insert"):
            E._insert_contributions(X, ctf, inv_sigma2, vol_base, spec, geom, F_acc, W_acc, fine, timer)
        with timer("stats"):
            return E._batch_stats(X, inv_sigma2, shells, spec, geom, stats, n_shells, fine)

    S.maximisation = maximisation
    S.expectation_batch = expectation_batch
