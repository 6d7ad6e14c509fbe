"""Transforms between real space and the FFT layouts: images (rfft2), volumes with the gridding pre-correction and
zero padding (rfftn, chunked), the chunked cropped inverse of a reconstruction, phase shifts."""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..backend import xp_of
from .grids import freq_grid_2d

#: the reconstruction's division and inverse FFT go in this many chunks of planes or rows (its temporaries are
#: ~1/RECONSTRUCT_CHUNKS of the volume's)
RECONSTRUCT_CHUNKS = 16


# ------------------------------------------------------------------------------------------- 2D FFTs
def image_fft(images):
    """(n, N, N) real -> (n, N, N//2+1) complex (centre at N//2 moved to the origin)."""
    xp = xp_of(images)
    return xp.fft.rfft2(xp.fft.ifftshift(images, axes=(-2, -1)))


def image_ifft(F, box: int):
    """Inverse of :func:`image_fft`: (n, N, N//2+1) complex -> (n, N, N) real (centre at N//2)."""
    xp = xp_of(F)
    return xp.fft.fftshift(xp.fft.irfft2(F, s=(box, box)), axes=(-2, -1))


def shift_phases(box: int, shifts, xp=np, dtype=np.complex64):
    """(n, N, N//2+1) factors exp(-2 pi i k.s/N): multiplying an image's FFT by them moves it by +s pixels.

    ``shifts`` is (n, 2) as (sx, sy) in pixels.
    """
    ky, kx = freq_grid_2d(box, xp)
    s = xp.asarray(shifts, dtype=xp.float64).reshape(-1, 2)
    ph = -2.0 * np.pi / box * (kx[None] * s[:, 0, None, None] + ky[None] * s[:, 1, None, None])
    return xp.exp(1j * ph).astype(dtype)


# ----------------------------------------------------------------------------------- gridding factors
@lru_cache(maxsize=16)
def _sinc2_1d_host(n_real: int, n_padded: int) -> np.ndarray:
    x = (np.arange(n_real) - n_real // 2) / n_padded
    return np.sinc(x) ** 2


def gridding_factor(box: int, pad: int, xp=np, rows=None):
    """Separable sinc^2 of the trilinear kernel on the box: real-space attenuation of trilinear sampling ->
    (box, box, box) float64, x / Np from the centre N//2 (Np = pad * box). ``rows``: only those y rows (a slice
    or an index array: (box, len(rows), box), the same values), for the reconstructions that go by rows."""
    s = xp.asarray(_sinc2_1d_host(box, pad * box))
    sy = s if rows is None else s[rows]
    return s.reshape(-1, 1, 1) * sy.reshape(1, -1, 1) * s.reshape(1, 1, -1)


# --------------------------------------------------------------------------------------------- volumes
def pad_volume(vol, pad: int):
    """(..., N, N, N) -> (..., pad N, pad N, pad N), the box in the centre, zeros around it."""
    xp = xp_of(vol)
    n = vol.shape[-1]
    npad = pad * n
    out = xp.zeros(vol.shape[:-3] + (npad, npad, npad), dtype=vol.dtype)
    o = (npad - n) // 2
    out[..., o:o + n, o:o + n, o:o + n] = vol
    return out


def crop_volume(vol, box: int):
    """(..., Np, Np, Np) -> the central (..., box, box, box) (a view)."""
    npad = vol.shape[-1]
    o = (npad - box) // 2
    return vol[..., o:o + box, o:o + box, o:o + box]


def volume_fft(vol, pad: int = 2, gridding: bool = True, out=None):
    """Projector preparation: gridding pre-correction, zero padding, 3D rFFT -> (Np, Np, Np//2+1).

    rfftn(ifftshift(padded)) without the padded real volume: the rows of the box are transformed along x and
    placed at their wrapped (ifftshifted) y, z; then the box's z planes along y and every column along z, in
    place, by chunks (~1/:data:`RECONSTRUCT_CHUNKS` of the volume): the output and small temporaries only. A
    stack (V, N, N, N) gives (V, Np, Np, Np//2+1), each volume transformed in its place of the output (``out``:
    a C-contiguous complex array of that shape to write into)."""
    xp = xp_of(vol)
    if vol.ndim != 3:
        npad = pad * vol.shape[-1]
        if out is None:  # the single volume's dtype: complex128 from the float64 gridding factor
            cdt = np.result_type(vol.dtype, np.float64 if gridding else np.float32, np.complex64)
            out = xp.empty(vol.shape[:-3] + (npad, npad, npad // 2 + 1), dtype=cdt)
        for v in range(vol.shape[0]):
            volume_fft(vol[v], pad, gridding, out=out[v])
        return out
    box = vol.shape[-1]
    npad = pad * box
    v = vol / gridding_factor(box, pad, xp) if gridding else vol
    dst = xp.asarray((np.arange(box) + (npad - box) // 2 - npad // 2) % npad)  # wrapped index of each box index
    rows = xp.zeros((box, box, npad), dtype=np.result_type(v.dtype, np.float32))
    rows[..., dst] = v
    del v
    rows = xp.fft.rfft(rows, axis=-1)                                         # (box_z, box_y, Np//2+1)
    if out is None:
        out = xp.zeros((npad, npad, npad // 2 + 1), dtype=rows.dtype)
    else:
        out[...] = 0
    out[dst[:, None], dst[None, :]] = rows
    del rows
    step = -(-npad // RECONSTRUCT_CHUNKS)
    for z0 in range(0, box, step):
        zs = dst[z0:z0 + step]
        out[zs] = xp.fft.fft(out[zs], axis=1)
    for y0 in range(0, npad, step):
        out[:, y0:y0 + step] = xp.fft.fft(out[:, y0:y0 + step], axis=0)
    return out


def volume_ifft(F, box: int, pad: int = 2, gridding: bool = True):
    """Inverse of :func:`volume_fft` (with the gridding correction) -> real (box, box, box)."""
    xp = xp_of(F)
    npad = pad * box
    vol = xp.fft.fftshift(xp.fft.irfftn(F, s=(npad, npad, npad), axes=(-3, -2, -1)), axes=(-3, -2, -1))
    vol = crop_volume(vol, box)
    if gridding:
        vol = vol / gridding_factor(box, pad, xp)
    return vol


def _ifft_cropped(F, box: int, pad: int, reach: float | None = None, gridding: bool = True):
    """:func:`volume_ifft` of a private (Np, Np, Np//2+1) complex ``F`` (complex64: FFTs in single precision),
    overwritten, in
    :data:`RECONSTRUCT_CHUNKS` chunks: ifft along ky of the kz planes (those with |kz| <= ``reach`` only, F
    being zero beyond it), then per chunk of the y rows inside the crop ifft along kz and irfft along kx of the
    columns kx <= ``reach``, kept at the z and x inside the crop -> real (box, box, box) float64 (float32 from a
    complex64 ``F``)."""
    xp = xp_of(F)
    npad = F.shape[0]
    nxh = npad // 2 + 1
    ncol = nxh if reach is None else min(nxh, int(np.floor(reach)) + 1)
    k = np.abs(np.fft.fftfreq(npad, d=1.0 / npad))
    band = np.flatnonzero(k <= reach) if reach is not None else np.arange(npad)
    step = -(-npad // RECONSTRUCT_CHUNKS)
    for i in range(0, band.size, step):
        zs = xp.asarray(band[i:i + step])
        F[zs, :, :ncol] = xp.fft.ifft(F[zs, :, :ncol], axis=1)
    # fftshift + crop: cropped index i of an axis reads full index (o + i + Np/2) mod Np
    o = (npad - box) // 2
    src = xp.asarray((np.arange(o, o + box) + npad // 2) % npad)
    out = xp.empty((box, box, box), dtype=xp.float32 if F.dtype == np.complex64 else xp.float64)
    step = -(-box // RECONSTRUCT_CHUNKS)
    for y0 in range(0, box, step):
        ys = src[y0:y0 + step]
        col = xp.fft.ifft(F[:, ys, :ncol], axis=0)[src]                    # (box_z, ny, ncol)
        part = xp.fft.irfft(col, n=npad, axis=-1)[..., src]                  # (box_z, ny, box_x)
        # the gridding factor of the chunk's rows only
        out[:, y0:y0 + step, :] = part / gridding_factor(box, pad, xp, slice(y0, y0 + step)) if gridding else part
    return out
