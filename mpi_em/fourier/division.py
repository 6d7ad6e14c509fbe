"""From accumulators to maps: the Hermitian merge of the kx = 0 plane, the regularised divisor, the reconstruction
ball, the division and inverse transform (:func:`reconstruct`), RELION's soft mask outside the map."""
from __future__ import annotations

import numpy as np

from ..backend import xp_of
from .grids import default_r_max, shell_index
from .transforms import RECONSTRUCT_CHUNKS, _ifft_cropped


def enforce_hermitian_x0(F, W=None, dim: int = 3):
    """Merge the kx = 0 plane's Friedel pairs (RELION enforceHermitianSymmetry), in place.

    Both (ky, kz) and (-ky, -kz) on the kx = 0 plane receive data during insertion; they describe one
    Fourier component, so each becomes the sum of itself and the conjugate of its mirror. ``dim`` 3: volumes
    (..., Np, Np, Np//2+1); ``dim`` 2: planes (..., Np, Np//2+1), whose kx = 0 column pairs ky with -ky.
    """
    xp = xp_of(F)
    npad = F.shape[-2]
    mirror = (-xp.arange(npad)) % npad

    def mirrored(a):  # a[..., -k, -k'] of the kx = 0 plane (or a[..., -k] of the column)
        for axis in range(-1, -dim, -1):
            a = xp.take(a, mirror, axis=axis)
        return a

    x0 = (Ellipsis, 0)
    plane = F[x0]
    F[x0] = plane + xp.conj(mirrored(plane))
    if W is not None:
        wp = W[x0]
        W[x0] = wp + mirrored(wp)


def regularised_denominator(W, r, mean_w, tau2=None, tau2_fudge: float = 1.0, min_weight: float = 1e-3):
    """The divisor of F in reconstruction, shared by 2D and 3D: max(W, min_weight * mean_w) without a prior,
    W + 1 / (tau2_fudge * tau2(shell)) (floored at 1e-10 * mean_w) with one; ``r`` is |k| in image pixels and
    ``mean_w`` the mean weight inside the ball (a scalar, or broadcastable per volume/plane). Shapes: ``W`` (...,
    *grid) real, ``r`` broadcastable to the grid, ``tau2`` (n_shells,) or (..., n_shells) -> the shape of ``W``,
    float64.

    A shell whose tau2 is 0 (no signal: the gold-standard FSC is 0 or below) has a prior of zero variance, so its
    coefficients come out 0 (a divisor of 1e20 x mean W: 1e-20 of their unregularised value), as RELION's (whose
    FSC floor of 0.001 makes them ~1000x smaller). Treating tau2 = 0 as "no prior" divided those noise-only
    shells by W alone: the half maps' noise there grew up to 60x the signal's power, at the edge of the band the
    E-step aligns with (benchmarks/results/refine3d-convergence/)."""
    xp = xp_of(W)
    floor_ok = xp.asarray(mean_w) > 0
    if tau2 is None:
        return xp.maximum(W, xp.where(floor_ok, min_weight * xp.asarray(mean_w), 1.0))
    tau2 = xp.asarray(tau2, dtype=xp.float64)
    sh = shell_index(r, tau2.shape[-1] - 1)
    t = tau2[..., sh] * tau2_fudge
    scale = xp.where(floor_ok, xp.asarray(mean_w, dtype=xp.float64), 1.0)
    # tau2 = 0: 1e20 x mean W, not infinity: complex / inf is NaN on CuPy (its division scales by |divisor|)
    denom = W + xp.where(t > 0, 1.0 / xp.where(t > 0, t, 1.0), 1e20 * scale)
    return xp.maximum(denom, 1e-10 * scale)


def reconstruction_ball(r, r_max: float, box: int):
    """The Fourier voxels a reconstruction keeps (bool, the shape of ``r``), ``r`` = |k| in image pixels: r <= r_max + 1/2, and r < N/2 (the
    padded grid's Nyquist sphere, RELION's bound, which only matters from r_max = N/2 on)."""
    return (r <= r_max + 0.5) & (r < box / 2)


#: voxels of every volume :func:`soft_mask_outside` works on at a time (its temporaries; few launches on a GPU)
SOFT_MASK_SLAB_VOXELS = 1 << 22


def soft_mask_outside(vol, width: float = 3.0, inplace: bool = False, ndim: int = 3):
    """RELION's ``softMaskOutsideMap`` (radius N/2), applied to every reconstruction: beyond N/2 + ``width`` px from
    the centre the map is the mean of the voxels beyond N/2 (weighted by the edge), and over the ``width`` px in
    between it is blended into it by a raised cosine. Interpolation aliasing and noise in the box corners, which
    the gridding correction amplifies (2x at the corners for pad 2), are gone: without it a noise-free
    RELION-projected map's FSC against the truth was 0.96 at 0.9 Nyquist instead of 0.999, a noisy map's mean FSC
    0.044 below relion_reconstruct's (``benchmarks/relion_parity.py``). ``vol`` (..., N, N, N) float (``ndim`` 2:
    images (..., N, N), RELION's 2D class averages), any array module; a new array, or ``vol`` itself with
    ``inplace``. Volumes go in slabs of z planes (temporaries of :data:`SOFT_MASK_SLAB_VOXELS`)."""
    xp = xp_of(vol)
    n = vol.shape[-1]
    out = vol if inplace else vol.copy()
    c = np.arange(n, dtype=np.float64) - n // 2
    ryx2 = xp.asarray(c[:, None] ** 2 + c[None, :] ** 2)

    def edge(z):  # 0 inside radius N/2, 1 beyond N/2 + width; z: None (an image) or a slice of z planes
        rz2 = 0.0 if z is None else xp.asarray(c[z] ** 2)[:, None, None]
        t = xp.clip((xp.sqrt(rz2 + ryx2) - n / 2) / width, 0.0, 1.0)
        return 0.5 - 0.5 * xp.cos(np.pi * t)

    if ndim == 2:
        e = edge(None)
        bg = ((out * e).sum(axis=(-2, -1)) / float(e.sum()))[..., None, None]
        out *= 1 - e
        out += bg * e
        return out
    # slabs of z planes (one slab at box 256)
    lead = int(np.prod(vol.shape[:-3], dtype=np.int64))
    step = max(1, min(n, SOFT_MASK_SLAB_VOXELS // (n * n * max(lead, 1))))
    slabs = [slice(z, min(z + step, n)) for z in range(0, n, step)]
    num, den = 0.0, 0.0
    for z in slabs:
        e = edge(z)
        num = num + (out[..., z, :, :] * e).sum(axis=(-3, -2, -1))
        den += float(e.sum())
    bg = (num / den)[..., None, None, None]
    for z in slabs:
        e = edge(z)
        out[..., z, :, :] = out[..., z, :, :] * (1 - e) + bg * e
    return out


def reconstruct(F_acc, W_acc, box: int, pad: int = 2, r_max: float | None = None, tau2=None,
                tau2_fudge: float = 1.0, min_weight: float = 1e-3, gridding: bool = True,
                mask_outside: bool = False):
    """Regularised division and inverse transform of the accumulators -> real volume (box^3).

    Without tau2: V = F / max(W, min_weight * mean(W in ball)) (known-pose reconstruction).
    With tau2 (per image-pixel shell): V = F / (W + 1 / (tau2_fudge * tau2(shell))) (RELION's MAP estimate).
    Voxels outside :func:`reconstruction_ball` are 0. ``mask_outside``: :func:`soft_mask_outside` on the
    gridding-corrected map (RELION applies it before the correction: the same map to 1e-3 in FSC).
    The inputs are not modified.

    Lean: one working copy of F in the accumulators' precision (complex128; complex64 for single-precision
    accumulators, whose inverse FFT is then in single precision too) and temporaries of ~1/:data:`RECONSTRUCT_CHUNKS`
    of the volume: W is read chunk by chunk, the division and the inverse FFT (:func:`_ifft_cropped`) go plane by
    plane, in place, and only the rows and columns inside the final crop are transformed along the last axes.
    """
    r_max = default_r_max(box) if r_max is None else r_max
    F = divide_in_ball(F_acc, W_acc, box, 3, pad, r_max, tau2, tau2_fudge, min_weight)
    vol = _ifft_cropped(F, box, pad, reach=pad * (r_max + 0.5), gridding=gridding)
    return soft_mask_outside(vol, inplace=True) if mask_outside else vol


def divide_in_ball(F_acc, W_acc, box: int, dim: int, pad: int, r_max: float, tau2=None, tau2_fudge: float = 1.0,
                   min_weight: float = 1e-3):
    """The reconstruction's division, one implementation for volumes (``dim`` 3: :func:`reconstruct`) and planes
    (``dim`` 2: :func:`mpi_em.fourier2d.reconstruct2d`): a copy of ``F_acc`` in its precision (complex128, or
    complex64 for single-precision accumulators), the Hermitian merge of its kx = 0 plane (column) and of a
    float64 copy of that plane of ``W_acc`` (W itself is read chunk by chunk, in float64, and not copied whole),
    F divided in place by :func:`regularised_denominator` (float64) inside :func:`reconstruction_ball`, 0 outside
    -> F (the inputs are not modified). The mean weight of the floor is one number for a volume (summed chunk by
    chunk) and one per plane for planes (a stack of class averages: each plane its own floor). Volumes go in
    ~1/:data:`RECONSTRUCT_CHUNKS` chunks of kz planes (temporaries of that size), planes in one."""
    xp = xp_of(F_acc)
    npad = pad * box
    F = xp.array(F_acc, dtype=np.result_type(F_acc.dtype, np.complex64))
    W0 = xp.array(W_acc[..., :1], dtype=xp.float64)  # the kx = 0 plane (column), merged with F's
    enforce_hermitian_x0(F, W0, dim)
    step = -(-npad // RECONSTRUCT_CHUNKS) if dim == 3 else npad
    k0 = np.fft.fftfreq(npad, d=1.0 / npad)                               # the chunked axis: kz (3D), ky (2D)
    ky = xp.fft.fftfreq(npad, d=1.0 / npad).reshape(1, -1, 1)
    kx = xp.arange(npad // 2 + 1, dtype=xp.float64).reshape((1,) * (dim - 1) + (-1,))
    rest = (slice(None),) * (dim - 1)

    # 3D: the chunks of kz planes that reach the ball (one all past r_max + 1/2 holds none of it: zeroed alone)
    starts = [a0 for a0 in range(0, npad, step) if dim != 3 or np.abs(k0[a0:a0 + step]).min() / pad <= r_max + 0.5]

    def chunks():  # (index of the chunk, |k| / pad in image pixels, the ball) per chunk of the first axis
        for a0 in starts:
            z = xp.asarray(k0[a0:a0 + step]).reshape((-1,) + (1,) * (dim - 1))
            r = xp.sqrt(z * z + ky * ky + kx * kx if dim == 3 else z * z + kx * kx) / pad
            yield (Ellipsis, slice(a0, a0 + step)) + rest, r, reconstruction_ball(r, r_max, box)

    def weights(sl):  # the chunk of W in float64, its kx = 0 plane (column) merged
        w = W_acc[sl].astype(xp.float64)
        w[..., 0] = W0[sl][..., 0]
        return w

    if dim == 3:
        total, count = 0.0, 0
        for sl, r, inside in chunks():  # mean of W in the ball
            total += float(weights(sl)[inside].sum())
            count += int(inside.sum())
        mean_w = total / count if count else 1.0
    else:
        (sl, _, inside), = chunks()
        mean_w = (weights(sl) * inside).sum(axis=(-2, -1), keepdims=True) / max(int(inside.sum()), 1)
    for a0 in sorted(set(range(0, npad, step)) - set(starts)):  # the chunks of kz planes past the ball: all zero
        F[..., a0:a0 + step, :, :] = 0
    for sl, r, inside in chunks():  # division in place, zero outside the ball
        Fc = F[sl]
        Fc /= regularised_denominator(weights(sl), r, mean_w, tau2, tau2_fudge, min_weight)
        Fc[..., ~inside] = 0
    return F
