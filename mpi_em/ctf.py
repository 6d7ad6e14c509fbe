"""Contrast transfer function, RELION's formula (src/ctf.h, CTF::initialise and CTF::getCTF).

    lambda = 12.2643247 / sqrt(V (1 + 0.978466e-6 V))        [Å, V in volts; relativistic]
    K1 = pi * lambda,  K2 = pi/2 * Cs * lambda^3 (Cs in Å),  K3 = atan(Q0 / sqrt(1 - Q0^2)),
    K4 = -B / 4,  K5 = phase_shift (rad)
    deltaf(X, Y) = -( (dU + dV)/2 + (dU - dV)/2 * cos(2 (atan2(Y, X) - azimuth)) )
    CTF(X, Y) = -sin(K1 deltaf u^2 + K2 u^4 - K5 - K3) * exp(K4 u^2),  u^2 = X^2 + Y^2 [1/Å^2]

The result is laid out on the rfft2 grid of a box (see :mod:`mpi_em.fourier`).
"""
from __future__ import annotations

import numpy as np

from .fourier import freq_grid_2d


def electron_wavelength(voltage_kv, xp=np):
    v = xp.asarray(voltage_kv, dtype=xp.float64) * 1e3
    return 12.2643247 / xp.sqrt(v * (1.0 + v * 0.978466e-6))


def ctf_values(fx, fy, defocus_u, defocus_v, defocus_angle, voltage, cs, amp_contrast,
               phase_shift=0.0, bfactor=0.0, xp=np, intact_first_peak: bool = False):
    """CTF at spatial frequencies (fx, fy) in 1/Å; parameters broadcast against them.

    ``intact_first_peak``: 1 (times the B-factor envelope) wherever |phase| < pi/2, i.e. up to the first peak,
    as RELION's --ctf_intact_first_peak (CTF::getCTF with do_intact_until_first_peak)."""
    lam = electron_wavelength(voltage, xp)
    k1 = np.pi * lam
    k2 = np.pi / 2.0 * xp.asarray(cs, dtype=xp.float64) * 1e7 * lam ** 3
    q0 = xp.asarray(amp_contrast, dtype=xp.float64)
    k3 = xp.arctan(q0 / xp.sqrt(1.0 - q0 * q0))
    k4 = -xp.asarray(bfactor, dtype=xp.float64) / 4.0
    k5 = xp.deg2rad(xp.asarray(phase_shift, dtype=xp.float64))
    du = xp.asarray(defocus_u, dtype=xp.float64)
    dv = xp.asarray(defocus_v, dtype=xp.float64)
    az = xp.deg2rad(xp.asarray(defocus_angle, dtype=xp.float64))
    u2 = fx * fx + fy * fy
    ang = xp.arctan2(fy, fx)
    deltaf = -((du + dv) * 0.5 + (du - dv) * 0.5 * xp.cos(2.0 * (ang - az)))
    arg = k1 * deltaf * u2 + k2 * u2 * u2 - k5 - k3
    val = -xp.sin(arg)
    if intact_first_peak:
        val = xp.where(xp.abs(arg) < np.pi / 2, 1.0, val)
    return val * xp.exp(k4 * u2)


def _ctf_at(kx, ky, box: int, pixel_size, defocus_u, defocus_v, defocus_angle, voltage, cs, amp_contrast,
            phase_shift, bfactor, xp, dtype, intact_first_peak, scale=1.0):
    """CTFs of n particles (per-particle parameter arrays) at frequency indices kx, ky of a box (any shape S,
    same for all particles) -> (n,) + S. ``scale`` (rlnCtfScalefactor) multiplies the result, last, as in RELION's
    CTF::getCTF (src/ctf.h: ``retval *= scale`` after the B-factor envelope)."""
    def col(a):
        return xp.asarray(a, dtype=xp.float64).reshape((-1,) + (1,) * kx.ndim)
    apix = col(pixel_size)
    fx = kx[None] / (box * apix)
    fy = ky[None] / (box * apix)
    out = ctf_values(fx, fy, col(defocus_u), col(defocus_v), col(defocus_angle), col(voltage), col(cs),
                     col(amp_contrast), col(phase_shift), col(bfactor), xp=xp, intact_first_peak=intact_first_peak)
    if scale is not None and not (np.ndim(scale) == 0 and float(scale) == 1.0):
        out = out * col(scale)
    return out.astype(dtype)


def ctf_images(box: int, pixel_size, defocus_u, defocus_v, defocus_angle, voltage, cs, amp_contrast,
               phase_shift=0.0, bfactor=0.0, xp=np, dtype=np.float32, intact_first_peak: bool = False, scale=1.0):
    """(n, box, box//2+1) CTFs on the rfft2 grid, one per particle (per-particle parameter arrays)."""
    ky, kx = freq_grid_2d(box, xp)
    ky, kx = xp.broadcast_arrays(ky, kx)
    return _ctf_at(kx, ky, box, pixel_size, defocus_u, defocus_v, defocus_angle, voltage, cs, amp_contrast,
                   phase_shift, bfactor, xp, dtype, intact_first_peak, scale)


def ctf_points(geom, pixel_size, defocus_u, defocus_v, defocus_angle, voltage, cs, amp_contrast,
               phase_shift=0.0, bfactor=0.0, dtype=np.float32, intact_first_peak: bool = False, scale=1.0):
    """(n, m) CTFs at the in-ball points of ``geom`` (:class:`mpi_em.fourier.SliceGeometry`): the values of
    :func:`ctf_images` there, without evaluating the rest of the rfft2 grid."""
    xp = geom.xp
    k = xp.asarray(geom.kxy, dtype=xp.float64)
    return _ctf_at(k[:, 0], k[:, 1], geom.box, pixel_size, defocus_u, defocus_v, defocus_angle, voltage, cs,
                   amp_contrast, phase_shift, bfactor, xp, dtype, intact_first_peak, scale)
