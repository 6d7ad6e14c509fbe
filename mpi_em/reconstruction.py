"""Batched insertion of particles with known poses into Fourier accumulators (the M-step's data path).

An accumulator pair (F: complex, W: real) per volume lives in FFT layout (see :mod:`mpi_em.fourier`).
Insertion of a batch: FFT the images, undo their origin shifts by phase factors, multiply by the CTF, and
back-project CTF.X with CTF^2 weights for every symmetry copy A.L of each pose.
"""
from __future__ import annotations

import numpy as np

from .fourier import SliceGeometry, backproject, fused_kernels, image_fft, shift_phases


class Accumulators:
    """F (n_vol, Np, Np, Np//2+1) complex and W real, on the array module ``xp``."""

    def __init__(self, geom: SliceGeometry, n_vol: int = 1, dtype=np.complex128):
        xp = geom.xp
        self.geom = geom
        self.F = xp.zeros((n_vol,) + geom.vol_shape, dtype=dtype)
        self.W = xp.zeros((n_vol,) + geom.vol_shape, dtype=np.zeros(0, dtype).real.dtype)

    @property
    def nbytes(self) -> int:
        return int(self.F.nbytes + self.W.nbytes)


def prepare_images(images, ctf, shifts_px, geom: SliceGeometry):
    """(n, N, N) images -> in-ball (data = CTF.X, weights = CTF^2), each (n, m), images re-centred by -shift."""
    xp = geom.xp
    F2 = image_fft(xp.asarray(images, dtype=xp.float32))
    if shifts_px is not None:
        F2 = F2 * shift_phases(geom.box, -xp.asarray(shifts_px), xp=xp, dtype=F2.dtype)
    x = geom.gather(F2)
    if ctf is None:
        return x, xp.ones(x.shape, dtype=xp.float32)
    c = geom.gather(xp.asarray(ctf))
    return c * x, c * c


def insert(acc: Accumulators, vol_index, A, data, weights, sym_mats=None) -> None:
    """Back-project prepared data for rotations A (n,3,3) into volume(s) ``vol_index`` (int or (n,) ints)."""
    xp = acc.geom.xp
    A = xp.asarray(A, dtype=xp.float64)
    if xp is not np and fused_kernels() and acc.F.dtype == np.complex128:
        from . import kernels  # one launch: every image, every symmetry copy, its own volume

        kernels.backproject(acc.F, acc.W, A, data, weights, acc.geom,
                            vol_index=xp.broadcast_to(xp.asarray(vol_index), (A.shape[0],)), sym_mats=sym_mats)
        return
    mats = [None] if sym_mats is None else [xp.asarray(L, dtype=xp.float64) for L in sym_mats]
    vol_index = np.asarray(vol_index)
    groups = [(int(vol_index), slice(None))] if vol_index.ndim == 0 else \
        [(int(k), xp.asarray(np.flatnonzero(vol_index == k))) for k in np.unique(vol_index)]
    for k, sel in groups:
        Ak, dk, wk = A[sel], data[sel], weights[sel]
        for L in mats:
            backproject(acc.F[k], acc.W[k], Ak if L is None else Ak @ L, dk, wk, acc.geom)


def insert_images(acc: Accumulators, vol_index, images, A, ctf=None, shifts_px=None, sym_mats=None) -> None:
    data, weights = prepare_images(images, ctf, shifts_px, acc.geom)
    insert(acc, vol_index, A, data, weights, sym_mats)
