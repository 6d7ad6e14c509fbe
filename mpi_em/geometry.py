"""Euler angles in RELION's ZYZ convention, batched.

RELION (src/euler.cpp, Euler_angles2matrix) builds A = Rz(psi) . Ry(tilt) . Rz(rot) with the *passive*
elementary rotations R(a) = [[cos a, sin a, 0], [-sin a, cos a, 0], [0, 0, 1]]. A maps the particle
(reference) frame to the image frame; the 3D Fourier coordinate of the 2D image frequency (kx, ky) is
A^T (kx, ky, 0) (RELION projector.cpp: "Use the inverse matrix").
"""
from __future__ import annotations

import numpy as np


def euler_to_matrix(rot, tilt, psi, xp=np):
    """(n,3,3) rotation matrices from angles in degrees (scalars or arrays of one length)."""
    rot, tilt, psi = (xp.deg2rad(xp.asarray(a, dtype=xp.float64)) for a in (rot, tilt, psi))
    rot, tilt, psi = xp.broadcast_arrays(xp.atleast_1d(rot), xp.atleast_1d(tilt), xp.atleast_1d(psi))
    ca, sa = xp.cos(rot), xp.sin(rot)
    cb, sb = xp.cos(tilt), xp.sin(tilt)
    cg, sg = xp.cos(psi), xp.sin(psi)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    A = xp.empty(rot.shape + (3, 3), dtype=xp.float64)
    A[..., 0, 0] = cg * cc - sg * sa
    A[..., 0, 1] = cg * cs + sg * ca
    A[..., 0, 2] = -cg * sb
    A[..., 1, 0] = -sg * cc - cg * sa
    A[..., 1, 1] = -sg * cs + cg * ca
    A[..., 1, 2] = sg * sb
    A[..., 2, 0] = sc
    A[..., 2, 1] = ss
    A[..., 2, 2] = cb
    return A


def matrix_to_euler(A, xp=np):
    """Inverse of :func:`euler_to_matrix` (RELION's Euler_matrix2angles), degrees, batched."""
    A = xp.asarray(A, dtype=xp.float64).reshape(-1, 3, 3)
    abs_sb = xp.sqrt(A[:, 0, 2] ** 2 + A[:, 1, 2] ** 2)
    regular = abs_sb > 16 * np.finfo(np.float64).eps
    # regular case
    gamma = xp.arctan2(A[:, 1, 2], -A[:, 0, 2])
    alpha = xp.arctan2(A[:, 2, 1], A[:, 2, 0])
    sign_sb = xp.where(xp.abs(xp.sin(gamma)) < 1e-6,
                       xp.sign(-A[:, 0, 2] / xp.where(xp.cos(gamma) == 0, 1, xp.cos(gamma))),
                       xp.sign(A[:, 1, 2] / xp.where(xp.sin(gamma) == 0, 1, xp.sin(gamma))))
    sign_sb = xp.where(sign_sb == 0, 1.0, sign_sb)
    beta = xp.arctan2(sign_sb * abs_sb, A[:, 2, 2])
    # degenerate case (tilt 0 or 180): all rotation in psi
    sing_beta = xp.where(A[:, 2, 2] > 0, 0.0, np.pi)
    sing_gamma = xp.where(A[:, 2, 2] > 0, xp.arctan2(-A[:, 1, 0], A[:, 0, 0]), xp.arctan2(A[:, 1, 0], -A[:, 0, 0]))
    alpha = xp.where(regular, alpha, 0.0)
    beta = xp.where(regular, beta, sing_beta)
    gamma = xp.where(regular, gamma, sing_gamma)
    return xp.rad2deg(alpha), xp.rad2deg(beta), xp.rad2deg(gamma)


def random_rotations(n: int, rng: np.random.Generator):
    """Uniformly distributed orientations as RELION angles (rot, tilt, psi) in degrees."""
    rot = rng.uniform(-180.0, 180.0, n)
    tilt = np.rad2deg(np.arccos(rng.uniform(-1.0, 1.0, n)))
    psi = rng.uniform(-180.0, 180.0, n)
    return rot, tilt, psi


def angular_distance(A, B, sym=None, xp=np):
    """Angle (deg) between rotations A and B (n,3,3), minimised over symmetry copies B.L if given."""
    A = xp.asarray(A).reshape(-1, 3, 3)
    B = xp.asarray(B).reshape(-1, 3, 3)
    mats = [xp.eye(3)] if sym is None else list(xp.asarray(sym))
    best = None
    for L in mats:
        R = xp.einsum("nij,nkj->nik", A, B @ L)
        c = xp.clip((xp.trace(R, axis1=1, axis2=2) - 1.0) / 2.0, -1.0, 1.0)
        ang = xp.rad2deg(xp.arccos(c))
        best = ang if best is None else xp.minimum(best, ang)
    return best
