"""Put a map made from scratch (arbitrary orientation, position and hand) onto a known truth, for measuring
ab-initio models on simulated data: the rotation from the refined poses against the true ones, the shift by
cross-correlation, and the hand that correlates better.

If V(x) = T(R x), every particle's pose satisfies A_est = A_true R, so R is the rotation mean of
A_true^T A_est over the particles; for the mirrored map, V(x) = T(R J x) with J = diag(1, 1, -1), the poses
satisfy A_est = J A_true R J. Both are tried (and their transposes, which do not cost more), and the one whose
aligned map has the higher correlation with the truth is kept. ``refine_alignment`` fits it to the truth from there
(a local search of the rotation and of a shift below a pixel), as a fit in a map viewer does.
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
    q = (np.asarray(M, dtype=np.float64) @ p) + (n // 2 + 1)  # in the map padded by one zero voxel on each side
    q[:, ((q <= 0) | (q >= n + 1)).any(axis=0)] = 0.0         # outside: the padding's corner, zero
    i0 = np.floor(q).astype(np.int64)
    f = q - i0
    m = n + 2
    padded = np.zeros((m, m, m))
    padded[1:-1, 1:-1, 1:-1] = vol
    flat = padded.ravel()
    base = (i0[2] * m + i0[1]) * m + i0[0]
    out = np.zeros(p.shape[1])
    for dz in (0, 1):
        wz = f[2] if dz else 1.0 - f[2]
        for dy in (0, 1):
            wzy = wz * (f[1] if dy else 1.0 - f[1])
            for dx in (0, 1):
                out += wzy * (f[0] if dx else 1.0 - f[0]) * flat[base + (dz * m + dy) * m + dx]
    return out.reshape(vol.shape)


def shift_onto(vol, ref) -> np.ndarray:
    """``vol`` moved by the integer shift that maximises its cross-correlation with ``ref`` (circular)."""
    return np.roll(vol, _cc_peak(vol, np.fft.rfftn(ref))[1], axis=(0, 1, 2))


def align_to_truth(vol, truth, est_angles, true_angles, refine: bool = False, rotation: bool = False):
    """(aligned map, name of the transform, correlation): ``vol`` rotated / mirrored / shifted onto ``truth``
    using the poses (rot, tilt, psi arrays in degrees, same particles in the same order). ``refine``: then fitted
    to the truth from there (``refine_alignment``: the rotation and a shift below a pixel; the name gets " fit").
    ``rotation``: the rotation M (``resample(vol, M)``) appended, e.g. to fit later from it."""
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
            best = (a, name, r, M)
    if refine:
        a, M, _, r = refine_alignment(vol, truth, best[3])
        best = (a, best[1] + " fit", r, M)
    return best if rotation else best[:3]


def resolution_to_truth(vol, truth, pixel_size: float, threshold: float = 0.5) -> float:
    return float(resolution_at(fsc(vol, truth), vol.shape[0], pixel_size, threshold))


def _unit(v):
    v = v - v.mean()
    return v / max(float(np.linalg.norm(v)), 1e-30)


def _cc_peak(a, ref_f):
    """(highest circular cross-correlation of ``a`` with the map whose rFFT is ``ref_f``, raised by a parabola
    through the peak and its two neighbours along each axis, so that it varies smoothly with a shift below a pixel;
    the integer shift of the peak)."""
    cc = np.fft.irfftn(ref_f * np.conj(np.fft.rfftn(a)), s=a.shape, axes=(0, 1, 2))
    i = np.unravel_index(int(np.argmax(cc)), cc.shape)
    top = float(cc[i])
    for ax in range(3):
        lo, hi = list(i), list(i)
        lo[ax], hi[ax] = (i[ax] - 1) % cc.shape[ax], (i[ax] + 1) % cc.shape[ax]
        m, p = float(cc[tuple(lo)]), float(cc[tuple(hi)])
        d = m - 2.0 * top + p
        if d < 0:
            top -= (p - m) ** 2 / (8.0 * d)
    return top, i


def _climb(score, state, best, candidates):
    """Pattern search: move to the first of ``candidates(state)`` that scores higher, while one does ->
    (state, score)."""
    moved = True
    while moved:
        moved = False
        for c in candidates(state):
            v = score(c)
            if v > best:
                state, best, moved = c, v, True
                break
    return state, best


def refine_alignment(vol, truth, M, step: float = 4.0, min_step: float = 0.125, shift_step: float = 0.25,
                     min_shift_step: float = 0.0625):
    """(aligned map, rotation, shift (x, y, z pixels; the map is moved by it after the rotation), correlation):
    ``resample(vol, M)`` put onto ``truth`` by a local search about ``M``: first of the rotation alone (pattern
    search: rotations by +-step degrees about x, y, z, the step halved down to 4 x ``min_step``; each scored by its
    best shift's correlation, the cross-correlation peak refined by parabolas), then of the rotation and the shift
    below a pixel together (Fourier phase shifts; steps from 2 x ``min_step`` degrees and ``shift_step`` pixels,
    halved down to ``min_step`` and ``min_shift_step``). The superposition a fit in a map viewer makes, from the
    pose-based start ``align_to_truth`` gives: those poses' mean rotation is several degrees off when many
    particles' poses are wrong."""
    from .sampling import rotation_vector_to_matrix
    from .symaxis import shift_map

    truth = np.asarray(truth, dtype=np.float64)
    n = truth.shape[0]
    t = _unit(truth)
    ref_f = np.fft.rfftn(t)
    axes = np.vstack([np.eye(3), -np.eye(3)])

    def turn(M, w_deg):
        return M @ rotation_vector_to_matrix(np.deg2rad(w_deg)[None])[0]

    def peak(M):
        return _cc_peak(_unit(resample(vol, M)), ref_f)

    M = np.asarray(M, dtype=np.float64)
    best = peak(M)[0]
    while step >= 4 * min_step:
        M, best = _climb(lambda C: peak(C)[0], M, best, lambda M: [turn(M, w) for w in axes * step])
        step /= 2
    roll = tuple((np.asarray(peak(M)[1]) + n // 2) % n - n // 2)

    def place(M, sh):
        return shift_map(np.roll(resample(vol, M), roll, axis=(0, 1, 2)), sh)

    def neighbours(state):
        M, sh = state
        moves = [(turn(M, w), sh) for w in axes * step] if step >= min_step else []
        return moves + ([(M, sh + e) for e in axes * shift_step] if shift_step >= min_shift_step else [])

    state = (M, np.zeros(3))
    cur = float(np.sum(_unit(place(*state)) * t))
    step = 2 * min_step
    while step >= min_step or shift_step >= min_shift_step:
        state, cur = _climb(lambda st: float(np.sum(_unit(place(*st)) * t)), state, cur, neighbours)
        step /= 2
        shift_step /= 2
    M, sh = state
    return place(M, sh), M, np.asarray(roll[::-1], dtype=np.float64) + sh, cur
