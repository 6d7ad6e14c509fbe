"""The E-step's numerical core, shared by 2D classification, 3D classification and 3D refinement.

Image model (RELION): X_i = CTF_i . P_pose V_k + noise, with complex Gaussian noise of variance 2 sigma^2(s) per
Fourier component of shell s. For a particle i, translation t and pose c (class k, orientation):

    log L(i, t, c) = - sum_s |X_i,t(s) - CTF_i(s) P_c(s)|^2 / (2 sigma^2(s))
                   = - |X_i|^2 term  +  Re sum_s X_i,t conj(P_c) CTF_i / sigma^2  -  sum_s CTF_i^2 |P_c|^2 / (2 sigma^2)

The cross term over many (t, c) is a real matrix product: [Re Y, Im Y] @ [Re P; Im P]^T with
Y = X_t . CTF / sigma^2 — one GEMM for a shared pose set (global search). For per-particle pose sets (local
searches and the oversampled fine pass) the translations are shared instead (X_t = X . phase_t, the fine pass's
around each particle's best coarse translation, folded into X): one GEMM of Z = Y conj(P) against the phases.
NumPy and CuPy alike (cuBLAS on the GPU).
"""
from __future__ import annotations

import numpy as np

from ..backend import xp_of
from ..fourier import shell_index


def shell_of_points(geom):
    """Integer shell (rounded |k|) of each in-ball point."""
    xp = geom.xp
    return shell_index(xp.sqrt((geom.kxy ** 2).sum(axis=1)))


def shared_operands(P):
    """The GEMM operands of a projection set shared by all particles, P (C, m) complex: B = [Re P, Im P] (C, 2m)
    and |P|^2 (C, m), float32; made once per reference set and iteration (not per batch). Beside P they take
    12 bytes per point and, while they are made, one real temporary of P's precision (no copies of them)."""
    xp = xp_of(P)
    B = xp.empty(P.shape[:-1] + (2 * P.shape[-1],), dtype=np.float32)
    P2 = xp.empty(P.shape, dtype=np.float32)
    fill_shared_operands(P, B, P2)
    return B, P2


def fill_shared_operands(P, B, P2) -> None:
    """:func:`shared_operands` of P (..., m) complex written into B (..., 2m) and P2 (..., m), float32 arrays or
    views of them (e.g. one chunk of orientations of a grid's operands)."""
    xp = xp_of(P)
    m = P.shape[-1]
    B[..., :m] = P.real
    B[..., m:] = P.imag
    xp.multiply(P.real, P.real, out=P2)
    P2 += xp.square(P.imag)


def shared_parts(Xt, ctf, inv_sigma2, ops):
    """log L = cross - norm over a shared projection set: Xt (n, T, m) complex, ctf (n, m), inv_sigma2 (m,),
    ops = :func:`shared_operands` -> cross (n, T, C) = Re <CTF X_t / sigma^2, P> (one real GEMM, inner size 2m)
    and norm (n, C) = sum CTF^2 |P|^2 / (2 sigma^2) (one GEMM), float32. The norm does not depend on the
    translation, so the coarse pass subtracts it after marginalising over translations.

    The particle-only term -sum |X|^2 / (2 sigma^2) is left out (constant over poses; see :func:`data_term`).
    """
    xp = xp_of(Xt)
    B, P2 = ops
    n, T, m = Xt.shape
    w = (ctf * inv_sigma2[None, :]).astype(np.float32)
    Y = Xt * w[:, None, :]
    A = xp.concatenate([Y.real.reshape(n * T, m), Y.imag.reshape(n * T, m)], axis=1)  # (nT, 2m)
    cross = (A @ B.T).reshape(n, T, -1)
    norm = (0.5 * ctf * ctf * inv_sigma2[None, :]).astype(np.float32) @ P2.T
    return cross, norm


def log_likelihood_shared(Xt, ctf, inv_sigma2, P):
    """Xt (n, T, m) complex, ctf (n, m), inv_sigma2 (m,), P (C, m) complex -> (n, T, C) float32."""
    cross, norm = shared_parts(Xt, ctf, inv_sigma2, shared_operands(P))
    return cross - norm[:, None, :]


def marginalise_translations(L, prior_t):
    """log sum_t exp(L[:, t, :] + prior_t[:, t]) for L (n, T, C) float32 and log priors (n, T) or (T,) (shared)
    -> (n, C) float32 (on GPUs one fused pass over L, :func:`mpi_em.kernels.logsumexp_translations`)."""
    xp = xp_of(L)
    prior_t = xp.broadcast_to(xp.asarray(prior_t, dtype=xp.float32), L.shape[:2])
    if xp is not np and L.dtype == np.float32 and L.flags.c_contiguous:
        from .. import kernels

        return kernels.logsumexp_translations(L, prior_t)
    return logsumexp(L + prior_t[:, :, None], axis=1, overwrite=True)


def logsumexp(a, axis: int, overwrite: bool = False):
    """log sum exp(a) along ``axis`` (removed), shifted by the maximum; -inf where every entry is -inf.
    ``overwrite``: ``a`` is a temporary the caller gives up (its exponentials are made in place: one array
    of a's size fewer)."""
    xp = xp_of(a)
    mx = a.max(axis=axis, keepdims=True)
    finite = xp.isfinite(mx)
    safe = xp.where(finite, mx, 0)
    if overwrite:
        e = xp.subtract(a, safe, out=a)
        xp.exp(e, out=e)
    else:
        e = xp.exp(a - safe)
    tot = e.sum(axis=axis, keepdims=True)  # >= 1 where the max is finite
    out = xp.where(finite, safe + xp.log(xp.where(finite, tot, 1.0)), mx)
    return out.squeeze(axis)


def log_likelihood_phased(X, ctf, inv_sigma2, P, ph):
    """Per-particle pose sets, translations shared by all particles: X (n, m) complex, ctf (n, m), inv_sigma2
    (m,), P (n, C, m) complex, ph (T, m) complex phases (X_t = X ph_t: :meth:`SliceGeometry.phases`) ->
    (n, T, C) float32 = Re <CTF X_t / sigma^2, P> - sum CTF^2 |P|^2 / (2 sigma^2).

    With Z = X CTF / sigma^2 conj(P) (n, C, m), the cross term Re sum_k ph_t Z_c = sum ph.re Z.re - ph.im Z.im is one
    real GEMM (n C, 2m) @ (2m, T) over Z's interleaved (re, im) floats: a tall, thin product that streams Z once,
    instead of n small (T, 2m) @ (2m, C) products (cuBLAS runs those far below its rate)."""
    xp = xp_of(X)
    n, C, m = P.shape
    w = (ctf * inv_sigma2[None, :]).astype(np.float32)
    Z = xp.conj(P).astype(np.complex64, copy=False) * (X * w).astype(np.complex64, copy=False)[:, None, :]
    B = xp.empty((ph.shape[0], m, 2), dtype=np.float32)                       # (ph.re, -ph.im) interleaved
    B[..., 0] = ph.real
    B[..., 1] = -ph.imag
    cross = Z.view(np.float32).reshape(n * C, 2 * m) @ B.reshape(-1, 2 * m).T   # (n C, T)
    del Z
    norm = ((P.real ** 2 + P.imag ** 2) * (0.5 * ctf * ctf * inv_sigma2[None, :])[:, None, :]).sum(axis=2)
    L = cross.reshape(n, C, -1) - norm[:, :, None].astype(np.float32)
    return xp.ascontiguousarray(L.transpose(0, 2, 1))


def weighted_phases(w, ph):
    """sum_t w[n, t, c] ph_t for weights w (n, T, C) and shared phases ph (T, m) -> (n, C, m) complex64, one real
    GEMM (n C, T) @ (T, 2m) over ph's interleaved (re, im) floats: times an image Xb (n, m), the weighted sum of
    its translations (:func:`weighted_translations`), for any image moved by the same translations."""
    xp = xp_of(ph)
    n, T, C = w.shape
    m = ph.shape[1]
    ph = xp.ascontiguousarray(ph.astype(np.complex64, copy=False))
    Q = w.transpose(0, 2, 1).reshape(n * C, T).astype(np.float32) @ ph.view(np.float32).reshape(T, 2 * m)
    return Q.view(np.complex64).reshape(n, C, m)


def weighted_translations(Xb, w, ph):
    """sum_t w[n, t, c] X_t for images Xb (n, m) complex shifted by shared phases ph (T, m) (X_t = Xb ph_t),
    weights w (n, T, C) -> (n, C, m) complex64: Xb * (w^T @ ph)."""
    Q = weighted_phases(w, ph)
    Q *= Xb.astype(np.complex64, copy=False)[:, None, :]
    return Q


def data_term(X, inv_sigma2):
    """-sum_s |X|^2 / (2 sigma^2) per particle (n,), the pose-independent part of log L."""
    return -0.5 * ((X.real ** 2 + X.imag ** 2) * inv_sigma2[None, :]).sum(axis=1)


def posterior(logp):
    """Normalised weights over all axes but the first, computed after subtracting each particle's max.

    Returns (weights float64-safe in the input's precision, max log value per particle, log of the sum).
    """
    xp = xp_of(logp)
    n = logp.shape[0]
    flat = logp.reshape(n, -1)
    mx = flat.max(axis=1)
    e = xp.exp((flat - mx[:, None]).astype(xp.float64))
    s = e.sum(axis=1)
    w = (e / s[:, None]).reshape(logp.shape)
    return w, mx, xp.log(s)


def significant_mask(weights, fraction: float = 0.999, max_count: int | None = None):
    """Per particle, the smallest set of entries (flattened over the trailing axes) whose weights sum to
    >= ``fraction`` (RELION's significant weights), at most ``max_count``. Returns a boolean mask."""
    xp = xp_of(weights)
    n = weights.shape[0]
    flat = weights.reshape(n, -1)
    order = xp.argsort(-flat, axis=1)
    sorted_w = xp.take_along_axis(flat, order, axis=1)
    csum = xp.cumsum(sorted_w, axis=1)
    # keep entry j if the mass before it is still below the fraction
    before = csum - sorted_w
    keep_sorted = before < fraction
    if max_count is not None:
        keep_sorted[:, max_count:] = False
    keep_sorted[:, 0] = True
    mask = xp.zeros_like(keep_sorted)
    xp.put_along_axis(mask, order, keep_sorted, axis=1)
    return mask.reshape(weights.shape)


def top_k(values, k: int):
    """Indices (n, k) of the k largest entries of each row of a (n, C) array, best first (ties: lowest index).
    k passes of argmax (k is a handful of poses; a full sort of C ~ 10^4-10^5 candidates per row is not needed)."""
    xp = xp_of(values)
    n, C = values.shape
    k = min(k, C)
    # distinct indices even where fewer than k entries are finite: -inf/NaN become the lowest finite value and
    # a taken entry becomes -inf, strictly below every untaken one
    v = xp.where(values > -np.inf, values, np.finfo(values.dtype).min)
    ar = xp.arange(n)
    out = xp.empty((n, k), dtype=xp.int64)
    for j in range(k):
        i = xp.argmax(v, axis=1)
        out[:, j] = i
        if j + 1 < k:
            v[ar, i] = -xp.inf
    return out


def offset_log_prior(shifts, sigma_px: float):
    """Gaussian prior on translations (T, 2) or (n, T, 2) in pixels -> same leading shape."""
    xp = xp_of(shifts)
    if sigma_px <= 0:
        return xp.zeros(shifts.shape[:-1], dtype=xp.float32)
    return (-(shifts ** 2).sum(axis=-1) / (2.0 * sigma_px ** 2)).astype(xp.float32)
