"""Symmetry axes of a map made without symmetry: the rotation and centre that put its symmetry axes onto a point
group's standard axes (RELION's placement, :func:`mpi_em.symmetry.symmetry_matrices`: C<n> about z, D<n> with a
2-fold on x, ...), as ``relion_align_symmetry`` does, then the symmetrised map and the particle poses in that frame.

Conventions (coordinates (x, y, z) in pixels about the box centre N//2, array index [z, y, x]): a frame (R, s)
moves the map by ``s`` first, then rotates it by R, so a feature at x lands at y = R (x + s) and the new map is
W(y) = V(R^T y - s). The map's symmetry centre is at -s before the move.

Search (RELION: a few hundred random orientations, then a local grid, on a small low-passed copy, keeping the one
whose symmetrised copy differs least from the rotated map): the map is Fourier cropped to a small box and soft
low-passed, re-centred on its centre of mass (within a sphere about the estimate, iterated), its rotational average
about the centre is removed (every rotation leaves it alone), and only the voxels inside a sphere are used. For a
rotation R the score is the mean, over the group's operators L other than the identity, of the correlation between
the copy of the map rotated into the frame, W, and W(L y) -- the map and its copy under the operator R^T L R. The
map's symmetrised copy S is the average of those copies, so its correlation with W is sqrt((1 + (n - 1) score) / n)
for a group of order n (S is W's orthogonal projection onto the symmetric maps): the two rank rotations alike, and
``score`` is 1 for a perfectly symmetric map in the frame and near the level of unrelated orientations otherwise.

The score of R and of N R are equal for every N of the group's normaliser (the rotations that map the group onto
itself): the frame is defined up to those. For C<n> that is any rotation about z and a flip of z, for D<n> (n > 2)
the group D<2n> (a rotation by 180/n deg about z maps D<n>'s 2-fold axes onto one another). The coarse grid
therefore covers only the quotient: axis directions on a hemisphere (HEALPix), and for D<n> in-plane angles in
[0, 180/n); T, O and I use :func:`mpi_em.sampling.orientation_grid` reduced to the group's asymmetric unit.
Coarse-to-fine: the best few coarse rotations on a half-size copy, then a pattern search (the 6 rotations by
+-step about x, y, z; step halving) on the working copy.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .backend import to_host, xp_of
from .fourier import _trilinear_stencil, volume_fft
from .geometry import euler_to_matrix, matrix_to_euler
from .sampling import angular_step, healpix_directions, orientation_grid, rotation_vector_to_matrix
from .symmetry import canonical_symmetry_name, symmetry_matrices

__all__ = ["SymmetryFrame", "find_symmetry_frame", "apply_symmetry_frame", "poses_in_frame", "symmetry_score",
           "centre_of_mass"]


@dataclass(frozen=True, eq=False)
class SymmetryFrame:
    """The frame found by :func:`find_symmetry_frame` (see the module docstring for the conventions).

    R: (3, 3) rotation; shift: (3,) pixels (x, y, z), applied before R; score: mean operator correlation at the
    best rotation (1 = symmetric); c1_score: the median score of (up to 48 of) the coarse grid's rotations on the
    same working copy, what orientations that do not align the axes give (a map without this symmetry scores not
    far above it); sym_cc: correlation of the rotated working copy with its symmetrised version; group: canonical
    name; step_deg: the last search step; evaluations: rotations x operators scored."""

    R: np.ndarray
    shift: np.ndarray
    score: float
    c1_score: float
    sym_cc: float
    group: str
    step_deg: float
    evaluations: int = field(default=0)


# ------------------------------------------------------------------------------------------- working copy
def centre_of_mass(vol) -> np.ndarray:
    """(x, y, z) pixels about N//2 of the positive part of ``vol`` (zeros for an empty map)."""
    xp = xp_of(vol)
    v = xp.maximum(xp.asarray(vol, dtype=xp.float64), 0.0)
    tot = float(v.sum())
    if tot <= 0:
        return np.zeros(3)
    out = []
    for ax in (2, 1, 0):  # x, y, z
        n = v.shape[ax]
        c = xp.arange(n, dtype=xp.float64) - n // 2
        prof = v.sum(axis=tuple(a for a in range(3) if a != ax))
        out.append(float((prof * c).sum()) / tot)
    return np.asarray(out)


def _masked_centre(w, radius: float, iterations: int = 100, tol: float = 1e-3) -> np.ndarray:
    """Centre of mass of the positive part of ``w`` above its median (the solvent level) within a sphere of
    ``radius`` about the current estimate, iterated from the box centre: noise inside the sphere pulls towards the
    estimate only, so the fixed point is the density's centre (a box-wide centre of mass of noisy map is pulled
    towards the box centre)."""
    xp = xp_of(w)
    m = w.shape[0]
    v = xp.maximum(w - xp.median(w), 0.0)
    c1 = xp.arange(m, dtype=xp.float64) - m // 2
    z, y, x = c1[:, None, None], c1[None, :, None], c1[None, None, :]
    c = np.zeros(3)
    for _ in range(iterations):
        wt = v * (((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) <= radius ** 2)
        tot = float(wt.sum())
        if tot <= 0:
            break
        new = np.array([float((wt * x).sum()), float((wt * y).sum()), float((wt * z).sum())]) / tot
        done = np.abs(new - c).max() < tol
        c = new
        if done:
            break
    return c


def _shift_phase(n: int, shift, xp):
    """exp(-2 pi i k.s / n) on the (n, n, n//2+1) rFFT grid: multiplying moves the map by +s."""
    k = xp.fft.fftfreq(n) * n
    kx = xp.fft.rfftfreq(n) * n
    s = np.asarray(shift, dtype=np.float64)
    ph = (kx[None, None, :] * s[0] + k[None, :, None] * s[1] + k[:, None, None] * s[2]) / n
    return xp.exp(-2j * np.pi * ph)


def shift_map(vol, shift):
    """``vol`` moved by ``shift`` (x, y, z) pixels, by Fourier phase shift (periodic)."""
    xp = xp_of(vol)
    n = vol.shape[0]
    F = xp.fft.rfftn(xp.fft.ifftshift(xp.asarray(vol, dtype=xp.float64)))
    return xp.fft.fftshift(xp.fft.irfftn(F * _shift_phase(n, shift, xp), s=vol.shape, axes=(0, 1, 2)))


class _Cropped:
    """The map's transform Fourier-cropped to m^3, to make working copies at any shift: the map moved by the shift,
    at a coarser voxel (values kept), with a raised-cosine fall-off over the outer fifth of the new Nyquist."""

    def __init__(self, vol, m: int):
        xp = self.xp = xp_of(vol)
        self.n, self.m = vol.shape[0], m
        F = xp.fft.rfftn(xp.fft.ifftshift(xp.asarray(vol, dtype=xp.float64)))
        if m < self.n:
            keep = np.r_[0:m // 2, self.n - m // 2:self.n]
            F = F[keep][:, keep][:, :, :m // 2 + 1]
        k = xp.fft.fftfreq(m)
        r = xp.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + xp.fft.rfftfreq(m)[None, None, :] ** 2) * 2.0
        w = xp.clip((1.0 - r) / 0.2, 0.0, 1.0)
        self.F = F * (0.5 - 0.5 * xp.cos(np.pi * w)) * (m / self.n) ** 3
        ki = xp.fft.fftfreq(m) * m  # the integer frequencies kept, the same on the n grid
        self.k = (xp.fft.rfftfreq(m) * m, ki, ki)

    def copy(self, shift):
        xp, m = self.xp, self.m
        kx, ky, kz = self.k
        s = np.asarray(shift, dtype=np.float64)
        ph = (kx[None, None, :] * s[0] + ky[None, :, None] * s[1] + kz[:, None, None] * s[2]) / self.n
        return xp.fft.fftshift(xp.fft.irfftn(self.F * xp.exp(-2j * np.pi * ph), s=(m, m, m), axes=(0, 1, 2)))


def _working_copy(vol, shift, m: int):
    return _Cropped(vol, m).copy(shift)


def _sphere_points(m: int, radius: float, xp):
    """(3, P) coordinates (x, y, z) about m//2 of the voxels within ``radius`` (at most m/2 - 2: no rotation
    takes a trilinear corner off the grid), and their flat indices."""
    radius = min(radius, m / 2 - 2)
    c = xp.arange(m, dtype=xp.float64) - m // 2
    z, y, x = xp.meshgrid(c, c, c, indexing="ij")
    inside = (x ** 2 + y ** 2 + z ** 2).ravel() <= radius ** 2
    idx = xp.flatnonzero(inside)
    return xp.stack([x.ravel()[idx], y.ravel()[idx], z.ravel()[idx]]), idx


def _sample(flat, m: int, q):
    """Trilinear values of the m^3 map ``flat`` (raveled) at points q (..., 3, P) about m//2 (all on the grid)."""
    xp = xp_of(flat)
    q = q + m // 2
    i0 = xp.floor(q)
    f = q - i0
    i0 = i0.astype(xp.int64)
    base = (i0[..., 2, :] * m + i0[..., 1, :]) * m + i0[..., 0, :]
    out = None
    for dz in (0, 1):
        wz = f[..., 2, :] if dz else 1.0 - f[..., 2, :]
        for dy in (0, 1):
            wzy = wz * (f[..., 1, :] if dy else 1.0 - f[..., 1, :])
            for dx in (0, 1):
                w = wzy * (f[..., 0, :] if dx else 1.0 - f[..., 0, :])
                v = w * flat[base + (dz * m * m + dy * m + dx)]
                out = v if out is None else out + v
    return out


def _operators(canon: str):
    """The non-identity operators, one of each pair {L, L^T}, with weight 2 for a pair and 1 for L = L^T."""
    L = symmetry_matrices(canon)[1:]
    ops, wts = [], []
    for g in L:
        if any(np.allclose(g.T, h, atol=1e-9) for h in ops):
            continue
        ops.append(g)
        wts.append(1.0 if np.allclose(g, g.T, atol=1e-9) else 2.0)
    return np.asarray(ops).reshape(-1, 3, 3), np.asarray(wts)


def _remove_radial(work):
    """``work`` minus its rotational average about m//2 (shells 1 px apart, linear in the radius): the part that
    every rotation leaves alone carries no orientation and would make all orientations correlate."""
    xp = xp_of(work)
    m = work.shape[0]
    c = xp.arange(m, dtype=xp.float64) - m // 2
    r = xp.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2).ravel()
    i0 = xp.floor(r).astype(xp.int64)
    f = r - i0
    v = work.ravel()
    nb = int(to_host(i0.max())) + 2
    num = xp.bincount(i0, weights=(1 - f) * v, minlength=nb) + xp.bincount(i0 + 1, weights=f * v, minlength=nb)
    den = xp.bincount(i0, weights=1 - f, minlength=nb) + xp.bincount(i0 + 1, weights=f, minlength=nb)
    prof = num / xp.maximum(den, 1e-12)
    return (v - ((1 - f) * prof[i0] + f * prof[i0 + 1])).reshape(work.shape)


class _Scorer:
    """Scores of many rotations on one working copy (batched: chunks of rotations x operators x voxels)."""

    def __init__(self, work, radius: float, canon: str, budget: int = 1 << 22):
        xp = xp_of(work)
        work = _remove_radial(work)
        self.xp, self.m = xp, work.shape[0]
        self.flat = work.ravel()
        self.pts, idx = _sphere_points(self.m, radius, xp)
        a = self.flat[idx]
        self.a = (a - a.mean()) / xp.linalg.norm(a - a.mean())
        ops, wts = _operators(canon)
        self.ops, self.wts = ops, wts / wts.sum()
        self.chunk = max(1, budget // max(1, len(ops) * self.pts.shape[1]))
        self.evaluations = 0

    def __call__(self, R) -> np.ndarray:
        R = np.asarray(R, dtype=np.float64).reshape(-1, 3, 3)
        if len(self.ops) == 0:
            return np.ones(len(R))
        xp = self.xp
        out = np.empty(len(R))
        for s in range(0, len(R), self.chunk):
            Rc = R[s:s + self.chunk]
            M = np.einsum("bji,ujk,bkl->buil", Rc, self.ops, Rc)  # R^T L R, acting on the old coordinates
            b = _sample(self.flat, self.m, xp.asarray(M) @ self.pts)  # (b, u, P)
            b = b - b.mean(axis=-1, keepdims=True)
            cc = (b @ self.a) / xp.maximum(xp.linalg.norm(b, axis=-1), 1e-30)
            out[s:s + len(Rc)] = to_host(cc) @ self.wts
        self.evaluations += len(R) * len(self.ops)
        return out


def _coarse_rotations(canon: str, order: int) -> np.ndarray:
    """Rotations R covering SO(3) modulo the group's normaliser (module docstring); R^T e_z = the axis found."""
    if canon[0] in "CD":
        rot, tilt = healpix_directions(order)
        keep = tilt <= 90.0 + 1e-9
        rot, tilt = rot[keep], tilt[keep]
        if canon[0] == "C":
            psi = np.zeros(1)
        else:
            span = 180.0 / int(canon[1:])
            k = max(1, int(np.ceil(span / angular_step(order) - 1e-9)))
            psi = np.arange(k) * (span / k)
        return euler_to_matrix(np.repeat(rot, psi.size), np.repeat(tilt, psi.size), np.tile(psi, rot.size))
    return np.transpose(orientation_grid(order, canon)[0], (0, 2, 1))


def _neighbours(step: float) -> np.ndarray:
    """The identity and the rotations by +-step deg about x, y and z (7, 3, 3): a pattern search's stencil."""
    w = np.vstack([np.zeros(3), np.eye(3), -np.eye(3)]) * np.deg2rad(step)
    return rotation_vector_to_matrix(w)


def _refine(scorer, R, scores, step: float, min_step: float, keep: int, max_moves: int = 6):
    """Pattern search around the ``keep`` best: move to the best of the 6 neighbours (rotations by +-step about
    x, y, z, left-multiplied) while one is better, then halve the step, down to ``min_step``."""
    best = np.argsort(-scores)[:keep]
    R, scores = R[best], scores[best]
    while True:
        delta = _neighbours(step)
        for _ in range(max_moves):
            cand = np.einsum("kij,njl->nkil", delta, R)
            s = scorer(cand.reshape(-1, 3, 3)).reshape(len(R), -1)
            j = s.argmax(axis=1)
            R, scores = cand[np.arange(len(R)), j], s[np.arange(len(R)), j]
            if not (j != 0).any():
                break
        if len(R) > 1:
            i = int(np.argmax(scores))
            R, scores = R[i:i + 1], scores[i:i + 1]
        if step / 2 < min_step:
            return R[0], float(scores[0]), step
        step /= 2


def _orthonormal(R):
    u, _, vt = np.linalg.svd(R)
    return u @ np.diag([1.0, 1.0, np.linalg.det(u @ vt)]) @ vt


def find_symmetry_frame(vol, group: str, apix: float = 1.0, work_box: int = 32, radius_px: float | None = None,
                        coarse_order: int = 2, min_step_deg: float = 0.5, keep: int = 4,
                        centre=None) -> SymmetryFrame:
    """The rotation (and centre) that puts the symmetry axes of ``vol`` onto ``group``'s standard axes.

    vol: (N, N, N) map (NumPy or CuPy); group: RELION point group name; apix: voxel size in Å (recorded for
    callers; the search works in pixels); work_box: box of the working copy (Fourier crop, <= N; the coarse grid
    works at half of it); radius_px: sphere radius in pixels of the input map (default 0.45 N); coarse_order:
    HEALPix order of the coarse grid (2 = 15 deg); min_step_deg: the finest local step; keep: coarse rotations
    refined; centre: the symmetry centre (x, y, z pixels about N//2) if known, else :func:`_masked_centre` of the
    working copy (a search of the centre on the score over-fits: the centre moved by 3 px raised a C1 map's best
    C4 score from 0.50 to 0.79).
    """
    canon = canonical_symmetry_name(group)
    n = vol.shape[0]
    if vol.ndim != 3 or vol.shape != (n, n, n):
        raise ValueError(f"expected a cubic map, got shape {tuple(vol.shape)}")
    m = min(int(work_box) // 2 * 2, n // 2 * 2)
    radius = (0.45 * n if radius_px is None else float(radius_px)) * m / n
    crop = _Cropped(vol, m)
    if centre is None:
        shift = -_masked_centre(crop.copy(np.zeros(3)), radius) * (n / m)
    else:
        shift = -np.asarray(centre, dtype=np.float64)
    if canon == "C1":
        return SymmetryFrame(np.eye(3), shift, 1.0, 1.0, 1.0, canon, 0.0)
    mc = max(8, m // 2 // 2 * 2)
    coarse = _Scorer(_Cropped(vol, mc).copy(shift), radius * mc / m, canon)
    R0 = _coarse_rotations(canon, coarse_order)
    s0 = coarse(R0)
    step = angular_step(coarse_order)
    Rc, _, _ = _refine(coarse, R0, s0, step / 2, step / 2, keep)  # one level on the coarse copy: nearest basin
    fine = _Scorer(crop.copy(shift), radius, canon)
    R, score, last = _refine(fine, Rc[None], fine(Rc[None]), step / 4, min_step_deg, 1)
    R = _orthonormal(R)
    sym_cc = _symmetrised_cc(fine, R, canon)
    c1_score = float(np.median(fine(R0[np.linspace(0, len(R0) - 1, min(48, len(R0))).astype(int)])))
    return SymmetryFrame(R, shift, score, c1_score, sym_cc, canon, last, coarse.evaluations + fine.evaluations)


def _symmetrised_cc(scorer, R, canon: str) -> float:
    """Correlation (in the sphere) of the working copy rotated into the frame and its symmetrised version."""
    xp = scorer.xp
    L = symmetry_matrices(canon)
    M = xp.asarray(np.einsum("ji,ujk->uik", R, L))  # W(L y) = V(R^T L y), on y = the sphere's points
    w = _sample(scorer.flat, scorer.m, xp.asarray(R.T) @ scorer.pts)
    s = _sample(scorer.flat, scorer.m, M @ scorer.pts).mean(axis=0)
    w, s = w - w.mean(), s - s.mean()
    return float(to_host((w @ s) / (xp.linalg.norm(w) * xp.linalg.norm(s))))


def symmetry_score(vol, frame: SymmetryFrame, group: str | None = None, work_box: int = 32,
                   radius_px: float | None = None) -> float:
    """The search's score of ``frame`` for ``vol`` (for ``group``, default the frame's own)."""
    canon = canonical_symmetry_name(group or frame.group)
    n = vol.shape[0]
    m = min(int(work_box) // 2 * 2, n // 2 * 2)
    radius = (0.45 * n if radius_px is None else float(radius_px)) * m / n
    return float(_Scorer(_working_copy(vol, frame.shift, m), radius, canon)(frame.R[None])[0])


# ------------------------------------------------------------------------------------------ application
def apply_symmetry_frame(vol, frame: SymmetryFrame, group: str | None = None, pad: int = 2):
    """``vol`` moved by ``frame.shift``, rotated by ``frame.R`` and averaged over ``group`` (default the frame's;
    "C1" only moves and rotates). As RELION rotates maps (relion_align_symmetry): the transform of the padded map
    with the gridding pre-correction, sampled by trilinear interpolation at the box's own frequencies (|k| < N/2),
    then an inverse FFT of the box; real, float64, the input's shape and array module."""
    xp = xp_of(vol)
    canon = canonical_symmetry_name(group or frame.group)
    n = vol.shape[0]
    F = volume_fft(shift_map(vol, frame.shift), pad=pad, gridding=True)
    npad = F.shape[0]
    k = xp.fft.fftfreq(n, 1.0 / n)
    kz, ky, kx = xp.meshgrid(k, k, xp.arange(n // 2 + 1, dtype=xp.float64), indexing="ij")
    q = xp.stack([kx.ravel(), ky.ravel(), kz.ravel()], axis=1)  # (V, 3) as (x, y, z), box frequencies
    inside = xp.flatnonzero((q ** 2).sum(axis=1) < (n / 2) ** 2)
    qi = q[inside] * (npad / n)  # the same frequencies on the padded grid
    Ff = F.ravel()
    L = symmetry_matrices(canon)
    acc = xp.zeros(qi.shape[0], dtype=F.dtype)
    chunk = 1 << 19
    for Lg in L:  # F_S(k) = mean_L F_V(R^T L k)
        M = xp.asarray(frame.R.T @ Lg)
        for s in range(0, qi.shape[0], chunk):
            idx, w, flip = _trilinear_stencil(qi[s:s + chunk] @ M.T, npad)
            g = (Ff[idx] * w).sum(axis=-1)
            acc[s:s + chunk] += xp.where(flip, xp.conj(g), g)
    out = xp.zeros(q.shape[0], dtype=F.dtype)
    out[inside] = acc / len(L)
    return xp.fft.fftshift(xp.fft.irfftn(out.reshape(n, n, n // 2 + 1), s=(n, n, n), axes=(0, 1, 2)))


def poses_in_frame(rot, tilt, psi, origin_x, origin_y, frame: SymmetryFrame, pixel_size: float = 1.0):
    """Particle poses for the map in ``frame`` that give the same images as (rot, tilt, psi, origin) gave of the
    input map. Angles in degrees (RELION's ZYZ, :mod:`mpi_em.geometry`); origins as RELION's (the image is the
    projection moved by -origin), in Å with ``pixel_size`` Å/px (1.0: in pixels).

    With W(y) = V(R^T y - s): A' = A R^T and origin' = origin + (A s)_xy (the symmetry centre, at -s in the input
    map, projects to -(A s)_xy). Returns (rot, tilt, psi, origin_x, origin_y) as float64 arrays."""
    A = euler_to_matrix(rot, tilt, psi)
    A2 = A @ frame.R.T
    r2, t2, p2 = matrix_to_euler(A2)
    d = A @ np.asarray(frame.shift, dtype=np.float64) * pixel_size  # (n, 3)
    ox = np.asarray(origin_x, dtype=np.float64) + d[:, 0]
    oy = np.asarray(origin_y, dtype=np.float64) + d[:, 1]
    return r2, t2, p2, ox, oy
