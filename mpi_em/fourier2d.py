"""2D references rotated in Fourier space (in-plane rotation for 2D classification), the 2D analogue of the
central-slice projector in :mod:`mpi_em.fourier`.

Conventions (batched; NumPy or CuPy through the arrays' own module):
- A reference image (box N, origin at N//2) is divided by the gridding factor sinc^2(x/Np) sinc^2(y/Np)
  (x, y from the centre; the real-space attenuation of bilinear interpolation), zero-padded to Np = pad*N and
  stored as rfft2(ifftshift(padded)) -> (Np, Np//2+1) "plane" [ky, kx], ky wrapped.
- In-plane rotation psi (deg): R = top-left 2x2 block of euler_to_matrix(0, 0, psi) = [[c, s], [-s, c]].
  Image frequency k = (kx, ky) samples the plane at pad * R^T k, exactly the z = 0 section of the 3D
  projector's pad * A^T (k, 0) for A = euler_to_matrix(0, 0, psi). In real space the reference point p lands
  on the image point R p (as the 3D projector puts p at (A p)_xy).
- Points with a negative x coordinate use Friedel symmetry F(-k) = conj(F(k)).
- Bilinear interpolation; :func:`project2d` and :func:`backproject2d` are exact adjoints under the real inner
  product Re<a, b> (they share :func:`_bilinear_stencil`).
- The in-ball frequency set is that of :class:`mpi_em.fourier.SliceGeometry` (``kxy``, ``index``, ``m``,
  ``pad``, ``npad``); r_max <= N/2 - 1 keeps every stencil inside the plane without wrap-around in x.
"""
from __future__ import annotations

import numpy as np

from .backend import scatter_add, xp_of
from . import kernels
from .fourier import SliceGeometry, default_r_max, enforce_hermitian_x0
from .fourier.division import divide_in_ball, soft_mask_outside
from .fourier.transforms import _sinc2_1d_host

__all__ = ["gridding_factor_2d", "pad_image", "crop_image", "plane_fft", "plane_ifft", "plane_shape",
           "rotation_matrices_2d", "plane_coords", "project2d", "backproject2d", "enforce_hermitian_x0_2d",
           "radius_plane", "reconstruct2d"]


# ----------------------------------------------------------------------------------------------- planes
def gridding_factor_2d(box: int, pad: int, xp=np):
    """Separable sinc^2 of the bilinear kernel on the (box, box) image: sinc^2(y/Np) sinc^2(x/Np)."""
    s = xp.asarray(_sinc2_1d_host(box, pad * box))
    return s.reshape(-1, 1) * s.reshape(1, -1)


def plane_shape(box: int, pad: int = 2) -> tuple[int, int]:
    npad = pad * box
    return (npad, npad // 2 + 1)


def pad_image(img, pad: int):
    xp = xp_of(img)
    n = img.shape[-1]
    npad = pad * n
    out = xp.zeros(img.shape[:-2] + (npad, npad), dtype=img.dtype)
    o = (npad - n) // 2
    out[..., o:o + n, o:o + n] = img
    return out


def crop_image(img, box: int):
    npad = img.shape[-1]
    o = (npad - box) // 2
    return img[..., o:o + box, o:o + box]


def plane_fft(images, pad: int = 2, gridding: bool = True):
    """Reference preparation: gridding pre-correction, zero padding, rfft2 -> (..., Np, Np//2+1)."""
    xp = xp_of(images)
    box = images.shape[-1]
    g = gridding_factor_2d(box, pad, xp)
    if images.dtype == xp.float32:  # keep single precision single
        g = g.astype(xp.float32)
    v = images / g if gridding else images
    return xp.fft.rfft2(xp.fft.ifftshift(pad_image(v, pad), axes=(-2, -1)))


def plane_ifft(F, box: int, pad: int = 2, gridding: bool = True):
    """Inverse transform and crop -> real (..., box, box), as :func:`fourier.volume_ifft`.

    With ``gridding`` the result is divided by the sinc^2 factor: the correction for the bilinear blur of
    :func:`backproject2d` (use it on reconstructions). It is therefore not the inverse of ``plane_fft(...,
    gridding=True)`` (which pre-divides); the exact inverse of a pre-corrected plane is
    ``plane_ifft(F, gridding=False) * gridding_factor_2d(box, pad)``.
    """
    xp = xp_of(F)
    npad = pad * box
    img = xp.fft.fftshift(xp.fft.irfft2(F, s=(npad, npad)), axes=(-2, -1))
    img = crop_image(img, box)
    if gridding:
        g = gridding_factor_2d(box, pad, xp)
        img = img / (g.astype(xp.float32) if img.dtype == xp.float32 else g)
    return img


# ------------------------------------------------------------------------------------------- rotations
def rotation_matrices_2d(psi_deg, xp=np):
    """(n, 2, 2) in-plane rotations of RELION's psi: the top-left block of euler_to_matrix(0, 0, psi),
    [[cos psi, sin psi], [-sin psi, cos psi]] (a reference point p goes to the image point R p)."""
    psi = xp.deg2rad(xp.atleast_1d(xp.asarray(psi_deg, dtype=xp.float64)))
    c, s = xp.cos(psi), xp.sin(psi)
    R = xp.empty(psi.shape + (2, 2), dtype=xp.float64)
    R[..., 0, 0] = c
    R[..., 0, 1] = s
    R[..., 1, 0] = -s
    R[..., 1, 1] = c
    return R


def plane_coords(geom: SliceGeometry, R):
    """(n, m, 2) padded-plane coordinates (x, y) = pad * R^T (kx, ky) for rotations R (..., 2, 2), n = prod(...)."""
    xp = geom.xp
    R = xp.asarray(R, dtype=xp.float64).reshape(-1, 2, 2)
    return geom.kxy @ (geom.pad * R)  # (m, 2) @ (n, 2, 2): one batched product (einsum loops slowly here)


def _bilinear_stencil(coords, npad: int):
    """Flat indices (n, m, 4) into one (Np, Np//2+1) plane, weights (n, m, 4), Friedel flags (n, m)."""
    xp = xp_of(coords)
    flip = coords[..., 0] < 0
    c = xp.where(flip[..., None], -coords, coords)
    c0 = xp.floor(c)
    f = c - c0
    c0 = c0.astype(xp.int64)
    nxh = npad // 2 + 1
    idx = []
    wts = []
    for dy in (0, 1):
        wy = f[..., 1] if dy else 1.0 - f[..., 1]
        iy = (c0[..., 1] + dy) % npad
        for dx in (0, 1):
            wx = f[..., 0] if dx else 1.0 - f[..., 0]
            idx.append(iy * nxh + c0[..., 0] + dx)
            wts.append(wy * wx)
    return xp.stack(idx, axis=-1), xp.stack(wts, axis=-1), flip


def _plane_size(geom: SliceGeometry) -> int:
    return geom.npad * (geom.npad // 2 + 1)


def project2d(Fplanes, R, geom: SliceGeometry, plane_index=None):
    """Rotated references, sampled on the in-ball points -> complex values.

    ``R`` is (..., 2, 2) (e.g. (n, 2, 2)); with lead = R.shape[:-2]:
    - ``Fplanes`` one plane (Np, Np//2+1): returns lead + (m,).
    - a stack (K, Np, Np//2+1) with ``plane_index`` (ints, shape lead): rotation i samples plane
      plane_index[i] -> lead + (m,).
    - a stack without ``plane_index``: every plane with every rotation -> (K,) + lead + (m,).
    """
    xp = xp_of(Fplanes)
    if kernels.use_fused(xp) and (Fplanes.ndim == 2 or plane_index is not None):
        return kernels.project2d(Fplanes, R, geom, plane_index if Fplanes.ndim == 3 else None)
    lead = tuple(R.shape[:-2])
    # corner by corner: each pass gathers and weights one contiguous (n, m) array (an (n, m, 4) stencil's
    # inner axis of 4 is slow to stack and reduce in NumPy); same corner order and weights as _bilinear_stencil
    coords = plane_coords(geom, R)
    flip = coords[..., 0] < 0
    c = xp.where(flip[..., None], -coords, coords)
    c0 = xp.floor(c)
    f = c - c0
    c0 = c0.astype(xp.int64)
    npad, nxh = geom.npad, geom.npad // 2 + 1
    rdt = Fplanes.real.dtype
    if Fplanes.ndim == 3 and plane_index is None:
        flat, off = Fplanes.reshape(Fplanes.shape[0], -1), 0
        lead = (Fplanes.shape[0],) + lead
    else:
        flat = Fplanes.reshape(-1)
        off = 0 if Fplanes.ndim == 2 else \
            xp.asarray(plane_index, dtype=xp.int64).reshape(-1, 1) * _plane_size(geom)
    vals = None
    for dy in (0, 1):
        wy = f[..., 1] if dy else 1.0 - f[..., 1]
        row = ((c0[..., 1] + dy) % npad) * nxh + off
        for dx in (0, 1):
            wx = f[..., 0] if dx else 1.0 - f[..., 0]
            i = row + c0[..., 0] + dx
            g = flat[:, i] if flat.ndim == 2 else flat[i]
            term = g * (wy * wx).astype(rdt)
            vals = term if vals is None else vals + term
    return xp.where(flip, xp.conj(vals), vals).reshape(lead + (geom.m,))


def backproject2d(F_acc, W_acc, R, data, weights, geom: SliceGeometry, plane_index=None):
    """Adjoint of :func:`project2d`: insert complex ``data`` and real ``weights`` (e.g. CTF.X, CTF^2).

    Accumulates in place into F_acc (complex) and W_acc (real, or None), each one plane (Np, Np//2+1) or a
    stack (K, Np, Np//2+1); ``data`` shaped as the output of :func:`project2d` in the same mode (lead + (m,)
    for one plane or with ``plane_index``, (K,) + lead + (m,) for a stack without it); ``weights`` the same
    or broadcastable to it.
    """
    xp = xp_of(F_acc)
    if kernels.use_fused(xp, F_acc, W_acc) and (F_acc.ndim == 2 or plane_index is not None):
        return kernels.backproject2d(F_acc, W_acc, R, data, weights, geom,
                                     plane_index if F_acc.ndim == 3 else None)
    idx, w, flip = _bilinear_stencil(plane_coords(geom, R), geom.npad)  # (n, m, 4), n = prod(lead)
    n = idx.shape[0]
    if F_acc.ndim == 3 and plane_index is None:
        K = F_acc.shape[0]
        idx = idx[None] + (xp.arange(K, dtype=xp.int64) * _plane_size(geom)).reshape(-1, 1, 1, 1)
        vshape = (K, n, geom.m)
    else:
        if F_acc.ndim == 3:
            idx = idx + xp.asarray(plane_index, dtype=xp.int64).reshape(-1, 1, 1) * _plane_size(geom)
        vshape = (n, geom.m)
    full = tuple(data.shape)
    d = xp.asarray(data).reshape(vshape)
    d = xp.where(flip, xp.conj(d), d)
    scatter_add(F_acc, idx, d[..., None] * w)
    if W_acc is not None and weights is not None:
        wt = xp.broadcast_to(xp.asarray(weights), full).reshape(vshape)
        scatter_add(W_acc, idx, wt[..., None] * w)


def enforce_hermitian_x0_2d(F, W=None):
    """Merge the kx = 0 column's Friedel pairs (ky, -ky), in place (:func:`fourier.enforce_hermitian_x0`, dim 2)."""
    enforce_hermitian_x0(F, W, dim=2)


def radius_plane(npad: int, xp=np):
    """|k| (padded-grid units) on the (npad, npad//2+1) rfft2 grid."""
    ky = xp.fft.fftfreq(npad, d=1.0 / npad).reshape(-1, 1)
    kx = xp.arange(npad // 2 + 1, dtype=xp.float64).reshape(1, -1)
    return xp.sqrt(ky * ky + kx * kx)


def reconstruct2d(F_acc, W_acc, box: int, pad: int = 2, r_max: float | None = None, tau2=None,
                  tau2_fudge: float = 1.0, min_weight: float = 1e-3, gridding: bool = True,
                  mask_outside: bool = False):
    """Regularised division and inverse transform of plane accumulators -> real image(s) (..., box, box).

    Without tau2: I = F / max(W, min_weight * mean(W in disc)) (known-pose reconstruction).
    With tau2 (per image-pixel shell, shape (..., n_shells)): I = F / (W + 1 / (tau2_fudge * tau2(shell))).
    For a stack (K, ...) the mean weight / floor is taken per plane. ``mask_outside``: RELION's soft mask
    outside the circle of diameter N (:func:`mpi_em.fourier.soft_mask_outside`), as its 2D class averages.
    The inputs are not modified.
    """
    r_max = default_r_max(box) if r_max is None else r_max
    F = divide_in_ball(F_acc, W_acc, box, 2, pad, r_max, tau2, tau2_fudge, min_weight)
    out = plane_ifft(F, box, pad, gridding=gridding)
    return soft_mask_outside(out, inplace=True, ndim=2) if mask_outside else out
