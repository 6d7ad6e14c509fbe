"""RELION-like orientation and translation sampling grids.

Conventions (see :mod:`mpi_em.geometry`): a pose A = euler_to_matrix(rot, tilt, psi) maps the reference frame
to the image frame; the projection direction (beam) in the reference frame is the third row of A,
A^T e_z = (sin(tilt) cos(rot), sin(tilt) sin(rot), cos(tilt)). Viewing directions are therefore given as
(rot, tilt) = (phi, theta) of a unit vector, exactly like RELION's HEALPix sampling.

Symmetry: for a map with V(L x) = V(x) (L in the point group), the poses A and A @ L give the same image
(the Fourier sample A^T k of the one becomes L^T A^T k of the other and the group holds L^T). The viewing
direction of A @ L is L^T v, so a direction v is equivalent to every L v (the group is closed under
transposition).

The grids are small and are built on the host in NumPy; functions with an ``xp`` argument hand their result
to that array module at the end. :func:`rotations_near` and :func:`perturb` work on NumPy or CuPy inputs.
"""
from __future__ import annotations

import numpy as np

from .backend import xp_of
from .geometry import euler_to_matrix
from .symmetry import canonical_symmetry_name, symmetry_matrices

__all__ = ["healpix_nside", "healpix_npix", "pix2ang_ring", "healpix_directions", "direction_vectors",
           "angular_step", "psi_angles", "reduce_to_asymmetric_unit", "orientation_grid", "local_rotations",
           "perturb", "rotation_vector_to_matrix", "rotations_near", "translation_grid", "next_perturbation"]


# ---------------------------------------------------------------------------------------------- HEALPix
def healpix_nside(order: int) -> int:
    if int(order) != order or order < 0:
        raise ValueError(f"HEALPix order must be a non-negative integer, got {order!r}")
    return 2 ** int(order)


def healpix_npix(order: int) -> int:
    return 12 * healpix_nside(order) ** 2


def pix2ang_ring(nside: int, ipix):
    """(theta, phi) in radians of the centres of RING-scheme pixels ``ipix`` (Gorski et al. 2005, ApJ 622, 759).

    Same arithmetic as HEALPix's pix2ang_ring: north polar cap (rings 1..nside-1), equatorial belt (rings
    nside..3 nside), south polar cap; z = cos(theta).
    """
    ipix = np.asarray(ipix, dtype=np.int64)
    npix = 12 * nside * nside
    if ipix.size and (ipix.min() < 0 or ipix.max() >= npix):
        raise ValueError(f"pixel index out of range [0, {npix})")
    ncap = 2 * nside * (nside - 1)
    fact2 = 4.0 / npix                      # = 1 / (3 nside^2)
    fact1 = 2 * nside * fact2               # = 2 / (3 nside)
    z = np.empty(ipix.shape, dtype=np.float64)
    phi = np.empty(ipix.shape, dtype=np.float64)

    north = ipix < ncap
    south = ipix >= npix - ncap
    belt = ~(north | south)

    p = ipix[north]
    iring = (1 + np.floor(np.sqrt(1.0 + 2.0 * p) + 1e-9).astype(np.int64)) >> 1  # isqrt, exact for these sizes
    iphi = p + 1 - 2 * iring * (iring - 1)
    z[north] = 1.0 - iring * iring * fact2
    phi[north] = (iphi - 0.5) * (0.5 * np.pi) / iring

    ip = ipix[belt] - ncap
    iring = ip // (4 * nside) + nside
    iphi = ip % (4 * nside) + 1
    fodd = np.where((iring + nside) & 1, 1.0, 0.5)  # 1 if iring + nside is odd, 1/2 otherwise
    z[belt] = (2 * nside - iring) * fact1
    phi[belt] = (iphi - fodd) * np.pi / (2 * nside)

    ip = npix - ipix[south]
    iring = (1 + np.floor(np.sqrt(2.0 * ip - 1.0) + 1e-9).astype(np.int64)) >> 1
    iphi = 4 * iring + 1 - (ip - 2 * iring * (iring - 1))
    z[south] = -1.0 + iring * iring * fact2
    phi[south] = (iphi - 0.5) * (0.5 * np.pi) / iring

    return np.arccos(np.clip(z, -1.0, 1.0)), phi


def healpix_directions(order: int, xp=np):
    """(rot_deg, tilt_deg) of the 12 * 4**order HEALPix pixel centres (RING order), rot = phi in [0, 360),
    tilt = theta in [0, 180]."""
    nside = healpix_nside(order)
    theta, phi = pix2ang_ring(nside, np.arange(12 * nside * nside))
    return xp.asarray(np.rad2deg(phi)), xp.asarray(np.rad2deg(theta))


def direction_vectors(rot_deg, tilt_deg, xp=None):
    """(n, 3) unit vectors (sin t cos r, sin t sin r, cos t): the projection direction (3rd row of A)."""
    xp = xp_of(rot_deg) if xp is None else xp
    r = xp.deg2rad(xp.asarray(rot_deg, dtype=xp.float64))
    t = xp.deg2rad(xp.asarray(tilt_deg, dtype=xp.float64))
    return xp.stack([xp.sin(t) * xp.cos(r), xp.sin(t) * xp.sin(r), xp.cos(t)], axis=-1)


def angular_step(order: int) -> float:
    """RELION's angular sampling (deg) of HEALPix order ``order``: 60 / 2**order (order 2 = 15 deg)."""
    return 60.0 / healpix_nside(order)


def psi_angles(order: int, xp=np):
    """In-plane angles in [0, 360) with RELION's step for the order (the same step as the directions)."""
    n = int(round(360.0 / angular_step(order)))
    return xp.asarray(np.arange(n) * (360.0 / n))


# ------------------------------------------------------------------------------------------- symmetry
def _group(sym):
    """Symmetry matrices (NumPy) from a name, None (C1) or an (n,3,3) array."""
    if sym is None:
        return np.eye(3)[None]
    if isinstance(sym, str):
        return symmetry_matrices(sym)
    return np.asarray(sym, dtype=np.float64).reshape(-1, 3, 3)


def asymmetric_unit_mask(rot_deg, tilt_deg, sym, tol: float = 1e-9) -> np.ndarray:
    """Boolean mask of the directions kept by :func:`reduce_to_asymmetric_unit` (host NumPy)."""
    v = direction_vectors(np.asarray(rot_deg, dtype=np.float64), np.asarray(tilt_deg, dtype=np.float64), np)
    L = _group(sym)
    if L.shape[0] == 1:
        return np.ones(v.shape[0], dtype=bool)
    w = np.einsum("gij,nj->ngi", L, v)  # images L v, (n, g, 3)
    vz, vy, vx = (v[:, None, c] for c in (2, 1, 0))
    wz, wy, wx = w[..., 2], w[..., 1], w[..., 0]
    # an image beats v if it is lexicographically larger in (z, y, x), comparisons to a tolerance
    gz, ez = wz > vz + tol, np.abs(wz - vz) <= tol
    gy, ey = wy > vy + tol, np.abs(wy - vy) <= tol
    gx = wx > vx + tol
    beaten = gz | (ez & (gy | (ey & gx)))
    return ~beaten.any(axis=1)


def reduce_to_asymmetric_unit(rot_deg, tilt_deg, sym, xp=np):
    """Keep the directions that lie in one asymmetric unit of point group ``sym``.

    Direction v (a reference-frame unit vector) is kept iff it is the lexicographic maximum of its images
    {L v : L in the group} compared by z, then y, then x (tolerance 1e-9). Exactly one member of every
    generic orbit is kept, so the kept region is a fundamental domain of the sphere (containing +z's cell);
    directions fixed by the whole group (a C<n> axis) are kept once. C1 / None keeps everything.
    Returns (rot_deg, tilt_deg) of the kept directions, in their original order.
    """
    rot = np.asarray(rot_deg, dtype=np.float64)
    tilt = np.asarray(tilt_deg, dtype=np.float64)
    keep = asymmetric_unit_mask(rot, tilt, sym)
    return xp.asarray(rot[keep]), xp.asarray(tilt[keep])


def orientation_grid(order: int, sym="C1", xp=np):
    """All (direction, psi) pairs of HEALPix order ``order``, directions reduced to the asymmetric unit.

    Returns (A (n,3,3), rot, tilt, psi), direction-major: pose j * n_psi + i has direction j and psi_i.
    """
    rot, tilt = healpix_directions(order)
    rot, tilt = reduce_to_asymmetric_unit(rot, tilt, sym)
    psi = psi_angles(order)
    R = np.repeat(rot, psi.size)
    T = np.repeat(tilt, psi.size)
    P = np.tile(psi, rot.size)
    A = euler_to_matrix(R, T, P)
    return xp.asarray(A), xp.asarray(R), xp.asarray(T), xp.asarray(P)


# ----------------------------------------------------------------------------------- local searches
def rotation_vector_to_matrix(w) -> np.ndarray:
    """Rodrigues: (k,3) rotation vectors (radians; direction = axis, length = angle) -> (k,3,3), right-handed
    (active, acting on column vectors)."""
    w = np.asarray(w, dtype=np.float64).reshape(-1, 3)
    th = np.linalg.norm(w, axis=1)
    safe = np.where(th > 0, th, 1.0)
    a = w / safe[:, None]
    K = np.zeros((w.shape[0], 3, 3))
    K[:, 0, 1], K[:, 0, 2], K[:, 1, 2] = -a[:, 2], a[:, 1], -a[:, 0]
    K[:, 1, 0], K[:, 2, 0], K[:, 2, 1] = a[:, 2], -a[:, 1], a[:, 0]
    s, c = np.sin(th)[:, None, None], np.cos(th)[:, None, None]
    R = np.eye(3)[None] + s * K + (1.0 - c) * (K @ K)
    R[th == 0] = np.eye(3)
    return R


def local_rotations(step_deg: float, n_per_axis: int = 3, xp=np):
    """Small rotations around the identity for a local (finer) search: (n_per_axis**3, 3, 3).

    The rotation vectors lie on a cubic grid with n_per_axis (odd) points per axis spanning
    [-step/2, +step/2] (for 3: {-1, 0, 1} * step/2), so the set covers the cell of a coarse grid of spacing
    ``step_deg``; the largest angle is sqrt(3) * step/2. The identity (w = 0) comes first, then the others in
    raster order (x fastest).

    Apply them on the LEFT, A_fine = R @ A_coarse (:func:`perturb`): R then acts in the image frame, its
    z-component changes psi (R = euler_to_matrix(0, 0, d) adds d to psi) and its x/y components tilt the
    viewing direction. angle(R @ A, A) = angle(R, I), so either side gives the same neighbourhood size.
    """
    if n_per_axis < 1 or n_per_axis % 2 == 0:
        raise ValueError(f"n_per_axis must be odd and >= 1, got {n_per_axis}")
    h = np.deg2rad(step_deg) / 2.0
    off = np.linspace(-h, h, n_per_axis) if n_per_axis > 1 else np.zeros(1)
    wz, wy, wx = np.meshgrid(off, off, off, indexing="ij")
    w = np.stack([wx.ravel(), wy.ravel(), wz.ravel()], axis=1)
    centre = (n_per_axis ** 3) // 2  # the zero vector
    order = [centre] + [i for i in range(w.shape[0]) if i != centre]
    return xp.asarray(rotation_vector_to_matrix(w[order]))


def perturb(A, R):
    """(n,3,3) coarse poses, (k,3,3) local rotations -> (n, k, 3, 3) poses R_k @ A_n."""
    xp = xp_of(A)
    A = xp.asarray(A, dtype=xp.float64).reshape(-1, 3, 3)
    R = xp.asarray(R, dtype=xp.float64).reshape(-1, 3, 3)
    return xp.einsum("kij,njl->nkil", R, A)


def rotations_near(A_center, max_angle_deg: float, order: int, sym=None):
    """Boolean mask (n, n_grid): grid pose g lies within ``max_angle_deg`` of centre c.

    The grid is ``orientation_grid(order, sym or "C1")`` (its columns, in its order). The angle is
    arccos((tr(A_c^T B) - 1) / 2), with B = A_g, minimised over the symmetry copies B = A_g @ L when ``sym``
    is given (the poses that give identical images of a symmetric map), so centres near the edge of the
    asymmetric unit also find their neighbours across it. Works on the array module of ``A_center``.
    """
    xp = xp_of(A_center)
    Ac = xp.asarray(A_center, dtype=xp.float64).reshape(-1, 3, 3)
    if sym is not None and isinstance(sym, str) and canonical_symmetry_name(sym) == "C1":
        sym = None
    Ag = orientation_grid(order, "C1" if sym is None else sym)[0]
    Ls = _group(sym)
    thr = 1.0 + 2.0 * np.cos(np.deg2rad(max_angle_deg)) - 1e-12  # angle <= max  <=>  trace >= thr
    best = None
    for L in Ls:
        B = xp.asarray(Ag @ L)
        tr = xp.einsum("cij,gij->cg", Ac, B)  # tr(A_c^T B)
        best = tr if best is None else xp.maximum(best, tr)
    return best >= thr


# -------------------------------------------------------------------------------------- translations
def translation_grid(max_shift_px: float, step_px: float = 1.0, xp=np):
    """(t, 2) shifts (sx, sy) in pixels on a square grid of spacing ``step_px`` inside the disc of radius
    ``max_shift_px`` (boundary included, 1e-9 tolerance). (0, 0) is always included and comes first; the rest
    follow in raster order (sy slowest). max_shift 0 gives [[0, 0]]."""
    if max_shift_px < 0:
        raise ValueError("max_shift_px must be >= 0")
    if max_shift_px == 0:
        return xp.zeros((1, 2), dtype=xp.float64)
    if step_px <= 0:
        raise ValueError("step_px must be > 0")
    n = int(np.floor(max_shift_px / step_px + 1e-9))
    c = np.arange(-n, n + 1) * float(step_px)
    sy, sx = np.meshgrid(c, c, indexing="ij")
    s = np.stack([sx.ravel(), sy.ravel()], axis=1)
    keep = (s ** 2).sum(axis=1) <= max_shift_px ** 2 * (1 + 1e-9) + 1e-12
    s = s[keep]
    zero = np.flatnonzero((s == 0).all(axis=1))[0]
    s = np.concatenate([s[zero:zero + 1], np.delete(s, zero, axis=0)])
    return xp.asarray(s)


# ------------------------------------------------------------------------------ random grid perturbation
def next_perturbation(previous: float, factor: float, seed: int, iteration: int) -> float:
    """The grids' random perturbation for ``iteration``, as a fraction of a step (RELION's
    HealpixSampling::resetRandomlyPerturbedSampling): previous + U(factor/2, factor), wrapped into
    [-factor, factor), so that it changes by at least half its range every iteration. Seeded by (seed,
    iteration): every rank draws the same value, and a resumed run the same sequence. factor 0: no perturbation.

    The grids are otherwise the same every iteration, so every particle's pose is rounded the same way each
    time and the references adapt to the grid; moving the grid by a random fraction of a step each iteration
    turns that rounding into noise that averages out."""
    if factor <= 0:
        return 0.0
    u = np.random.default_rng([int(seed), int(iteration), 0x5eed]).uniform(0.5 * factor, factor)
    return float((previous + u + factor) % (2.0 * factor) - factor)



# ------------------------------------------------------------------------------ translational sampling
def next_translations(step: float, search_range: float, accuracy: float, change: float):
    """The translational sampling after the angular sampling of an auto-refinement is refined (RELION's
    MlOptimiser::updateAngularSampling), in pixels. ``step``: the fine translation step (the coarse pass uses
    twice it, as RELION's adaptive oversampling); ``accuracy``: the translational accuracy (posterior standard
    deviation of an offset per axis); ``change``: the mean change of the particles' offsets in the last
    iteration. Returns (step, range):

    - coarse step = 2 min(1.5, 0.75 accuracy): a quarter finer than the accuracy, never coarser than 3 px;
    - range = 5 x change, at most 1.3 x the previous range, at least 1.5 coarse steps (a 3 x 3 coarse grid);
      wider than 4 coarse steps: halved; still wider: the coarse step becomes range / 4.

    So the coarse pass keeps between 9 and ~49 translations while the fine pass's spacing follows the accuracy
    (a fine step much coarser than the accuracy rounds every particle's offset onto the grid: quantisation
    noise of step / sqrt(12) per axis, re-drawn by every grid perturbation)."""
    coarse = 2.0 * min(1.5, 0.75 * float(accuracy))
    if not coarse > 0:
        coarse = 2.0 * float(step)
    rng = min(5.0 * float(change), 1.3 * float(search_range))
    rng = max(rng, 1.5 * coarse)
    if rng > 4.0 * coarse:
        rng /= 2.0
    if rng > 4.0 * coarse:
        coarse = rng / 4.0
    return coarse / 2.0, rng


def laplace_offset_variance(l_center, l_minus, l_plus, step: float, cap: float):
    """Posterior variance of an offset along one axis from the log-posterior at -step, 0, +step around its
    mode (Laplace's approximation: the curvature of a Gaussian log-density is -1 / variance). Valid however
    coarse the grid is compared with the posterior, where the posterior's own spread on the grid is not (a
    posterior narrower than the step puts all its weight on one point). Flat or convex: ``cap``."""
    xp = xp_of(l_center)
    curv = (l_minus + l_plus - 2.0 * l_center) / (step * step)
    return xp.where(curv < 0, xp.minimum(-1.0 / xp.where(curv < 0, curv, -1.0), cap), cap)
