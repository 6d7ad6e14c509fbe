"""Point-group symmetry applied to summed Fourier accumulators (RELION's BackProjector::symmetrise): one
interpolated gather per voxel and operator instead of one insertion per image and operator; the operators
themselves come from :mod:`mpi_em.symmetry`."""
from __future__ import annotations

import numpy as np

from .backend import xp_of
from . import kernels
from .fourier import enforce_hermitian_x0, radius_3d
from .fourier.projector import _trilinear_stencil


def symmetrise(F_acc, W_acc, sym_mats, chunk: int = 1 << 18) -> None:
    """Apply a point group to summed accumulators, in place (RELION's BackProjector::symmetrise).

    Inserting every pose once per operator L (rotation A @ L, :func:`mpi_em.fourier.backproject` with ``sym_mats``) puts the
    value inserted at p at L^T p; summed over the inserted data that is G_sym(q) = sum_L G(L q), which is what
    this computes by trilinear interpolation of the summed grid G: one gather per voxel and operator instead of
    one insertion per image and operator. It equals per-copy insertion to rounding for operators that map the
    grid onto itself (90 and 180 degree rotations about the axes), and to interpolation accuracy otherwise.
    F_acc (complex) and W_acc (real, or None) are FFT-layout volumes or stacks (..., Np, Np, Np//2+1). The kx = 0
    plane's Friedel pairs are merged first and the result's kx = 0 plane halved, so that the merge of
    :func:`mpi_em.fourier.reconstruct` gives the symmetrised sum. Voxels at |q| >= Np/2 (outside every reconstruction ball,
    :func:`mpi_em.fourier.reconstruction_ball`) are set to zero. Linear in the accumulators: ranks may symmetrise
    their partial sums before reducing them.
    """
    xp = xp_of(F_acc)
    L = np.asarray(sym_mats, dtype=np.float64).reshape(-1, 3, 3)
    if L.shape[0] == 1 and np.allclose(L[0], np.eye(3)):
        return
    W = W_acc if W_acc is not None else xp.zeros(F_acc.shape, dtype=F_acc.real.dtype)
    enforce_hermitian_x0(F_acc, W)
    npad = F_acc.shape[-3]
    rlim = float(np.sqrt((npad / 2) ** 2 - 0.5))  # |q|^2 is an integer: |q| < Np/2 <=> |q| <= rlim
    if kernels.use_fused(xp, F_acc):
        Fo, Wo = kernels.symmetrise(F_acc, W, L, rlim)
    else:
        Fo, Wo = _symmetrise_host(F_acc, W, L, rlim, chunk, xp)
    Fo[..., 0] *= 0.5
    Wo[..., 0] *= 0.5
    F_acc[...] = Fo
    if W_acc is not None:
        W_acc[...] = Wo


def _symmetrise_host(F, W, L, rlim, chunk, xp):
    """Array-module path of :func:`symmetrise`: the in-sphere voxels in chunks, one stencil gather per operator."""
    npad, nxh = F.shape[-3], F.shape[-1]
    lead = F.shape[:-3]
    Ff = F.reshape((-1, npad * npad * nxh))
    Wf = W.reshape((-1, npad * npad * nxh))
    Fo = xp.zeros_like(Ff)
    Wo = xp.zeros_like(Wf)
    k = xp.fft.fftfreq(npad, 1.0 / npad)
    inside = xp.flatnonzero(radius_3d(npad, xp).ravel() <= rlim)
    Lx = xp.asarray(L)
    for s in range(0, int(inside.size), chunk):
        flat = inside[s:s + chunk]
        q = xp.stack([flat % nxh, k[(flat // nxh) % npad], k[flat // (nxh * npad)]], axis=1).astype(xp.float64)
        for Lg in Lx:
            idx, w, flip = _trilinear_stencil(q @ Lg.T, npad)  # c = L q
            g = (Ff[:, idx] * w).sum(axis=-1)
            Fo[:, flat] += xp.where(flip, xp.conj(g), g)
            Wo[:, flat] += (Wf[:, idx] * w).sum(axis=-1)
    return Fo.reshape(lead + (npad, npad, nxh)), Wo.reshape(lead + (npad, npad, nxh))
