"""Batched insertion of particles with known poses into Fourier accumulators (the M-step's data path).

An accumulator pair (F: complex, W: real) per volume lives in FFT layout (see :mod:`mpi_em.fourier`).
Insertion of a batch: FFT the images, undo their origin shifts by phase factors, multiply by the CTF, and
back-project CTF.X with CTF^2 weights for every symmetry copy A.L of each pose.
"""
from __future__ import annotations

import numpy as np

from .fourier import SliceGeometry, backproject, image_fft


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


def centred_points(images, shifts_px, geom: SliceGeometry, ctf=None):
    """(n, N, N) images -> (X, CTF) at the in-ball points, each (n, m): the FFT of the images re-centred by -shift
    (``shifts_px`` (n, 2) or None; the phase factors are applied at the in-ball points only) and the CTFs, given
    at the points (n, m) or as (n, N, N//2+1) grids to gather (ones when None)."""
    xp = geom.xp
    x = geom.gather(image_fft(xp.asarray(images, dtype=xp.float32)))
    if shifts_px is not None:
        x = x * geom.phases(xp.asarray(shifts_px, dtype=xp.float64)[:, None, :], dtype=x.dtype)[:, 0]
    if ctf is None:
        return x, xp.ones(x.shape, dtype=xp.float32)
    ctf = xp.asarray(ctf)
    return x, ctf if ctf.ndim == 2 else geom.gather(ctf)


def prepare_images(images, ctf, shifts_px, geom: SliceGeometry):
    """(n, N, N) images -> in-ball (data = CTF.X, weights = CTF^2), each (n, m), images re-centred by -shift."""
    x, c = centred_points(images, shifts_px, geom, ctf)
    if ctf is None:
        return x, c
    return c * x, c * c


def insert(acc: Accumulators, vol_index, A, data, weights, sym_mats=None) -> None:
    """Back-project prepared data for rotations A (n,3,3) into volume(s) ``vol_index`` (int or (n,) ints), once
    per symmetry operator L (rotation A @ L) when ``sym_mats`` is given."""
    xp = acc.geom.xp
    A = xp.asarray(A, dtype=xp.float64)
    vol = xp.broadcast_to(xp.asarray(vol_index, dtype=xp.int64), (A.shape[0],))
    backproject(acc.F, acc.W, A, data, weights, acc.geom, vol_index=vol, sym_mats=sym_mats)


def insert_images(acc: Accumulators, vol_index, images, A, ctf=None, shifts_px=None, sym_mats=None) -> None:
    data, weights = prepare_images(images, ctf, shifts_px, acc.geom)
    insert(acc, vol_index, A, data, weights, sym_mats)
