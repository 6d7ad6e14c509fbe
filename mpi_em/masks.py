"""Masks: soft spherical masks (cosine edge) for 2D images and 3D volumes; solvent masks from a map (RELION's
relion_mask_create) and RELION's raised-cosine low-pass filter."""
from __future__ import annotations

import math

import numpy as np


def soft_sphere(box: int, radius: float, width: float = 3.0, ndim: int = 3, xp=np, dtype=np.float32):
    """1 inside ``radius`` (pixels from the centre N//2), raised-cosine fall-off over ``width``, 0 outside.
    Made from one ``dtype`` volume of squared radii (integers: exact in float32 up to box 4096) and the fall-off's
    shell in float64: no float64 grids of the whole box (a box-512 mask is 512 MiB; its float64 grids were ~7 GiB)."""
    c2 = (xp.arange(box, dtype=xp.float64) - box // 2) ** 2
    r2 = xp.zeros((box,) * ndim, dtype=dtype)
    for axis in range(ndim):
        r2 += c2.astype(dtype).reshape((box,) + (1,) * (ndim - 1 - axis))
    # the squared radii are integers: r^2 <= R^2 <=> r^2 <= floor(R^2) and r^2 < X <=> r^2 <= ceil(X) - 1, integer
    # thresholds that the float32 comparison holds exactly
    inner = math.floor(float(radius) ** 2)
    m = (r2 <= inner).astype(dtype)
    if width > 0:
        edge = r2 > inner
        edge &= r2 <= math.ceil((float(radius) + width) ** 2) - 1
        t = r2[edge].astype(xp.float64)  # the shell's radii, in place: 0.5 + 0.5 cos(pi (r - radius) / width)
        xp.sqrt(t, out=t)
        t -= radius
        t *= np.pi / width
        xp.cos(t, out=t)
        t *= 0.5
        t += 0.5
        m[edge] = t
    return m


def raised_cosine(xp, r, rc: float, width: float, dtype):
    """1 inside ``rc``, 0 beyond ``rc`` + ``width``, 0.5 + 0.5 cos(pi (r - rc) / width) between (RELION's soft
    edges: low-pass filters, ``softMaskOutsideMap``), in ``dtype``."""
    return (0.5 + 0.5 * xp.cos(np.pi * xp.clip((r - rc) / width, 0.0, 1.0))).astype(dtype)


def particle_masked_images(images, shifts_px, radius: float, width: float = 5.0):
    """RELION's zero mask of particle images (``--zero_mask``; ``softMaskOutsideMap`` in ``src/mask.cpp``): each of
    the (n, N, N) ``images`` kept inside a circle of ``radius`` px around its particle, a raised-cosine edge of
    ``width`` px, the image's background value beyond (the mean outside, weighted by 1 - mask: ~0 for normalised
    images). The particle of image i sits at N//2 + ``shifts_px[i]`` ((x, y) px, :func:`mpi_em.em.engine.
    image_shifts_px`); distances wrap around the box, so the masked image re-centred by a circular (Fourier) shift
    is the re-centred image masked about the centre, as RELION masks its images after moving them by their
    offsets. Returns float32 images on the images' array module."""
    from .backend import xp_of

    xp = xp_of(images)
    n, N = images.shape[0], images.shape[-1]
    s = xp.asarray(shifts_px, dtype=xp.float32).reshape(n, 2)
    c = xp.arange(N, dtype=xp.float32) - N // 2
    half = N / 2.0

    def wrapped(axis):  # (n, N) distance from the particle's centre along one axis, in [-N/2, N/2)
        return xp.mod(c[None, :] - s[:, axis:axis + 1] + half, N) - half

    dx, dy = wrapped(0), wrapped(1)
    r = xp.sqrt(dy[:, :, None] ** 2 + dx[:, None, :] ** 2)                      # (n, N, N)
    m = raised_cosine(xp, r, radius, width, xp.float32) if width > 0 else (r <= radius).astype(xp.float32)
    img = xp.asarray(images, dtype=xp.float32)
    out = 1.0 - m
    # the background's weighted sums as products (GEMMs: no reduction kernels that depend on the box on a GPU)
    flat = out.reshape(n, 1, N * N)
    wsum = (flat @ xp.ones((N * N, 1), dtype=xp.float32))[:, 0, 0]
    bg = (flat @ img.reshape(n, N * N, 1))[:, 0, 0] / xp.where(wsum > 0, wsum, 1.0)
    out *= bg[:, None, None]
    out += m * img
    return out


def _min_sq_distance(binary: np.ndarray, reach: int) -> np.ndarray:
    """Squared distance from every voxel to the nearest True voxel within the cube |dz|, |dy|, |dx| <= ``reach``
    (inf where there is none), as RELION's autoMask searches it. Exact: the squared distance is a sum over the
    axes, so the minimum over the cube is taken one axis at a time (3 (2 reach + 1) shifted minima)."""
    d = np.where(binary, 0.0, np.inf)
    if reach <= 0:
        return d
    offsets = np.arange(-reach, reach + 1)
    for axis in range(3):
        pad = [(0, 0)] * 3
        pad[axis] = (reach, reach)
        p = np.pad(d, pad, constant_values=np.inf)
        n = d.shape[axis]
        out = np.full(d.shape, np.inf)
        for o in offsets:
            sl = [slice(None)] * 3
            sl[axis] = slice(reach + o, reach + o + n)
            np.minimum(out, p[tuple(sl)] + float(o * o), out=out)
        d = out
    return d


def lowpass_map(vol, resolution: float, pixel_size: float, edge_width: int = 2) -> np.ndarray:
    """RELION's lowPassFilterMap: a raised-cosine low-pass from shell round(N apix / resolution) - edge_width // 2
    to + edge_width // 2 (frequencies in 1/pixel), zero beyond."""
    vol = np.asarray(vol, dtype=np.float64)
    n = vol.shape[-1]
    F = np.fft.rfftn(vol)
    F *= lowpass_weights(n, resolution, pixel_size, edge_width)
    return np.fft.irfftn(F, s=vol.shape, axes=(0, 1, 2))


def lowpass_weights(n: int, resolution: float, pixel_size: float, edge_width: int = 2, radius=None) -> np.ndarray:
    """The (n, n, n//2+1) weights of :func:`lowpass_map` (RELION's raised-cosine edge); at |k| = ``radius``
    (pixels of the n^3 grid) where given."""
    from .fourier import radius_3d

    ires = int(np.floor(n * pixel_size / resolution + 0.5))
    half = int(edge_width) // 2
    lo = max(0.0, (ires - half) / n)
    hi = min(n // 2 + 1, (ires + half) / n)
    res = (radius_3d(n) if radius is None else np.asarray(radius, dtype=np.float64)) / n
    w = np.ones_like(res)
    w[res > hi] = 0.0
    edge = (res >= lo) & (res <= hi)
    if hi > lo:
        w[edge] = 0.5 + 0.5 * np.cos(np.pi * (res[edge] - lo) / (hi - lo))
    return w


def threshold_mask(vol, threshold: float, extend: float = 0.0, soft_edge: float = 0.0) -> np.ndarray:
    """A solvent mask from a map, RELION's ``relion_mask_create`` (autoMask): 1 where ``vol >= threshold``;
    extended by ``extend`` pixels (a voxel becomes 1 when a 1-voxel lies closer than ``extend``; negative values
    shrink the mask the same way); then a raised-cosine edge ``soft_edge`` pixels wide, 0.5 + 0.5 cos(pi d / w)
    at distance d from the nearest 1-voxel. Returns float32 values in [0, 1]."""
    m = np.asarray(vol) >= threshold
    if extend > 0:
        m |= _min_sq_distance(m, int(np.ceil(extend))) < extend * extend
    elif extend < 0:
        m &= ~(_min_sq_distance(~m, int(np.ceil(-extend))) < extend * extend)
    out = m.astype(np.float64)
    if soft_edge > 0:
        d2 = _min_sq_distance(m, int(np.ceil(soft_edge)))
        edge = ~m & (d2 < soft_edge * soft_edge)
        out[edge] = 0.5 + 0.5 * np.cos(np.pi * np.sqrt(d2[edge]) / soft_edge)
    return out.astype(np.float32)


def auto_solvent_mask(maps, resolution: float, pixel_size: float, radius: float, threshold: float = 0.1,
                      extend: float | None = None, soft_edge: float | None = None) -> np.ndarray:
    """A solvent mask from the current reference, recomputed each iteration (refine3d / class3d --auto-mask).

    ``maps``: (N, N, N) or (V, N, N, N) (the two half maps, or the classes): their average, so that both half
    sets get the same mask. The average is low-passed to ``resolution`` Å (:func:`lowpass_map`), its values
    outside the sphere of ``radius`` pixels are ignored, and :func:`threshold_mask` keeps the voxels at or above
    ``threshold`` x its maximum inside the sphere, extended by ``extend`` pixels and given a raised-cosine edge
    ``soft_edge`` pixels wide (defaults: max(3, resolution / (2 pixel_size)) and max(3, resolution /
    (2 pixel_size)), as much as the low-pass blurs an edge); the result is multiplied by the hard sphere of
    ``radius`` pixels. Returns float32 (N, N, N) in [0, 1]; the sphere alone where nothing lies above the
    threshold."""
    vol = np.asarray(maps, dtype=np.float64)
    if vol.ndim == 4:
        vol = vol.mean(axis=0)
    n = vol.shape[-1]
    lp = lowpass_map(vol, max(float(resolution), 2.0 * pixel_size), pixel_size)
    sphere = soft_sphere(n, radius, width=0.0).astype(bool)
    blur = max(3.0, 0.5 * float(resolution) / pixel_size)
    extend = blur if extend is None else float(extend)
    soft_edge = blur if soft_edge is None else float(soft_edge)
    peak = float(lp[sphere].max()) if sphere.any() else 0.0
    if peak <= 0:
        return sphere.astype(np.float32)
    m = threshold_mask(np.where(sphere, lp, -np.inf), threshold * peak, extend, soft_edge)
    return (m * sphere).astype(np.float32)
