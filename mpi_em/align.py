"""Put a map made from scratch (arbitrary orientation, position and hand) onto a known truth, for measuring
ab-initio models on simulated data: the rotation from the refined poses against the true ones, the shift by
cross-correlation, and the hand that correlates better.

If V(x) = T(R x), every particle's pose satisfies A_est = A_true R, so R is the rotation mean of
A_true^T A_est over the particles; for the mirrored map, V(x) = T(R J x) with J = diag(1, 1, -1), the poses
satisfy A_est = J A_true R J. Both are tried (and their transposes, which do not cost more), and the one whose
aligned map has the higher correlation with the truth is kept.
"""
from __future__ import annotations

import numpy as np

from .fsc import fsc, resolution_at
from .geometry import euler_to_matrix

J = np.diag([1.0, 1.0, -1.0])


def rotation_mean(mats) -> tuple[np.ndarray, float]:
    """Chordal L2 mean of rotations (n, 3, 3) -> (rotation, spread in [0, 1]: 1 when all are equal)."""
    M = np.asarray(mats, dtype=np.float64).mean(axis=0)
    U, s, Vt = np.linalg.svd(M)
    D = np.diag([1.0, 1.0, np.sign(np.linalg.det(U @ Vt))])
    return U @ D @ Vt, float(np.linalg.norm(M) / np.sqrt(3.0))


def resample(vol, M) -> np.ndarray:
    """out(y) = vol(M y), coordinates about the centre N//2, trilinear, zero outside."""
    n = vol.shape[0]
    c = np.arange(n, dtype=np.float64) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    p = np.stack([x.ravel(), y.ravel(), z.ravel()])          # (3, V) as (x, y, z)
    q = (np.asarray(M, dtype=np.float64) @ p) + n // 2
    i0 = np.floor(q).astype(np.int64)
    f = q - i0
    out = np.zeros(p.shape[1])
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                ix, iy, iz = i0[0] + dx, i0[1] + dy, i0[2] + dz
                w = (f[0] if dx else 1 - f[0]) * (f[1] if dy else 1 - f[1]) * (f[2] if dz else 1 - f[2])
                ok = (ix >= 0) & (ix < n) & (iy >= 0) & (iy < n) & (iz >= 0) & (iz < n)
                out[ok] += w[ok] * vol[iz[ok], iy[ok], ix[ok]]
    return out.reshape(vol.shape)


def shift_onto(vol, ref) -> np.ndarray:
    """``vol`` moved by the integer shift that maximises its cross-correlation with ``ref`` (circular)."""
    cc = np.fft.irfftn(np.fft.rfftn(ref) * np.conj(np.fft.rfftn(vol)), s=vol.shape, axes=(0, 1, 2))
    s = np.unravel_index(int(np.argmax(cc)), cc.shape)
    return np.roll(vol, s, axis=(0, 1, 2))


def align_to_truth(vol, truth, est_angles, true_angles):
    """(aligned map, name of the transform, correlation): ``vol`` rotated / mirrored / shifted onto ``truth``
    using the poses (rot, tilt, psi arrays in degrees, same particles in the same order)."""
    A_e = euler_to_matrix(*[np.asarray(a, dtype=np.float64) for a in est_angles])
    A_t = euler_to_matrix(*[np.asarray(a, dtype=np.float64) for a in true_angles])
    R_n, _ = rotation_mean(np.einsum("nji,njk->nik", A_t, A_e))
    R_m, _ = rotation_mean(np.einsum("nji,jl,nlk,km->nim", A_t, J, A_e, J))
    best = None
    for name, M in (("R", R_n.T), ("R^T", R_n), ("mirror R", (R_m @ J).T), ("mirror R^T", J @ R_m),
                    ("mirror' R", J @ R_m.T), ("mirror' R^T", R_m @ J)):
        a = shift_onto(resample(vol, M), truth)
        r = float(np.corrcoef(a.ravel(), truth.ravel())[0, 1])
        if best is None or r > best[2]:
            best = (a, name, r)
    return best


def resolution_to_truth(vol, truth, pixel_size: float, threshold: float = 0.5) -> float:
    return float(resolution_at(fsc(vol, truth), vol.shape[0], pixel_size, threshold))
