"""Half-ball geometry and packing: the in-ball voxels (radius <= r_max) of FFT-layout arrays (..., Nz, Ny, Nx_half),
their cached masks and indices (host, and per GPU), and the bit-exact pack / unpack of those voxels (elements
moved as unsigned words, never as floats)."""
from __future__ import annotations

import functools

import numpy as np

from ..backend import xp_of


def _norm_key(shape, r_max) -> tuple[tuple[int, int, int], float]:
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3:
        raise ValueError(f"half-ball shape must be (Nz, Ny, Nx_half), got {shape}")
    return shape, float(r_max)


def _wrapped(n: int) -> np.ndarray:
    i = np.arange(n, dtype=np.int64)
    return np.where(i < n / 2, i, i - n)


@functools.lru_cache(maxsize=32)
def _host_mask(shape: tuple[int, int, int], r_max: float) -> np.ndarray:
    nz, ny, nx = shape
    kz = _wrapped(nz)
    ky = _wrapped(ny)
    kx = np.arange(nx, dtype=np.int64)
    r2 = (kz * kz)[:, None, None] + (ky * ky)[None, :, None] + (kx * kx)[None, None, :]
    mask = r2 <= r_max * r_max if r_max >= 0 else np.zeros(shape, dtype=bool)
    mask.setflags(write=False)
    return mask


@functools.lru_cache(maxsize=32)
def _host_index(shape: tuple[int, int, int], r_max: float) -> np.ndarray:
    idx = np.flatnonzero(_host_mask(shape, r_max)).astype(np.int64)  # sorted
    idx.setflags(write=False)
    return idx


@functools.lru_cache(maxsize=32)
def _device_array(kind: str, shape, r_max: float, device_id: int):
    import cupy as cp  # only reached with cupy arrays

    with cp.cuda.Device(device_id):
        host = _host_mask(shape, r_max) if kind == "mask" else _host_index(shape, r_max)
        return cp.asarray(host)


def _on(xp, kind: str, shape, r_max: float):
    host = _host_mask(shape, r_max) if kind == "mask" else _host_index(shape, r_max)
    if xp is np:
        return host
    return _device_array(kind, shape, r_max, int(xp.cuda.runtime.getDevice()))


def halfball_mask(shape, r_max, xp=np):
    """Boolean mask (Nz, Ny, Nx_half) of the voxels with radius <= r_max, FFT layout (read-only, cached)."""
    shape, r_max = _norm_key(shape, r_max)
    return _on(xp, "mask", shape, r_max)


def halfball_index(shape, r_max, xp=np):
    """Sorted flat int64 indices of the in-ball voxels of a (Nz, Ny, Nx_half) array (read-only, cached)."""
    shape, r_max = _norm_key(shape, r_max)
    return _on(xp, "index", shape, r_max)


def halfball_count(shape, r_max) -> int:
    """Number of in-ball voxels of one (Nz, Ny, Nx_half) volume."""
    shape, r_max = _norm_key(shape, r_max)
    return int(_host_index(shape, r_max).size)


def _word_dtype(itemsize: int) -> tuple[np.dtype, int]:
    """(unsigned word dtype, words per element) used to move elements bit-exactly."""
    for w in (8, 4, 2, 1):
        if itemsize % w == 0:
            return np.dtype(f"u{w}"), itemsize // w
    raise AssertionError(itemsize)  # pragma: no cover


def _words(a):
    """C-contiguous array a as unsigned words, shape a.shape + (words_per_element,)."""
    wdt, per = _word_dtype(a.dtype.itemsize)
    if a.ndim == 0:
        a = a.reshape(1)
        return a.view(wdt).reshape(per)
    return a.view(wdt).reshape(a.shape + (per,))


def _split(shape) -> tuple[tuple[int, ...], tuple[int, int, int]]:
    shape = tuple(int(n) for n in shape)
    if len(shape) < 3:
        raise ValueError(f"half-ball packing needs at least 3 axes (..., Nz, Ny, Nx_half), got shape {shape}")
    return shape[:-3], shape[-3:]


def _outside_nonzero(buf, r_max: float) -> bool:
    """True if any voxel outside the ball has a non-zero bit (buf C-contiguous)."""
    xp = xp_of(buf)
    _, vol = _split(buf.shape)
    mask = _on(xp, "mask", vol, float(r_max))
    w = _words(buf)  # (..., Nz, Ny, Nx, per)
    nz = w != 0
    if w.shape[-1] > 1:
        nz = nz.any(axis=-1)
    else:
        nz = nz[..., 0]
    nz &= ~mask
    return bool(nz.any())


# --------------------------------------------------------------------------- pack / unpack


def pack(buf, r_max):
    """The in-ball voxels of ``buf`` (..., Nz, Ny, Nx_half) as a C-contiguous array of shape (..., n_in).

    1-D when ``buf`` has exactly 3 axes; leading axes are kept. Same dtype, same module (NumPy/CuPy)
    as ``buf``; bit-exact (elements are moved as unsigned words).
    """
    xp = xp_of(buf)
    buf = xp.ascontiguousarray(buf)
    lead, vol = _split(buf.shape)
    idx = _on(xp, "index", vol, float(r_max))
    w = _words(buf)
    per = w.shape[-1]
    flat = w.reshape(lead + (-1, per))
    out = xp.take(flat, idx, axis=-2)  # (..., n_in, per), contiguous
    return out.view(buf.dtype).reshape(lead + (int(idx.size),))


def unpack(packed, shape, r_max, dtype=None):
    """Full array of ``shape`` (..., Nz, Ny, Nx_half): ``packed`` (..., n_in) in the ball, zeros outside."""
    xp = xp_of(packed)
    dtype = np.dtype(packed.dtype if dtype is None else dtype)
    lead, vol = _split(shape)
    idx = _on(xp, "index", vol, float(r_max))
    packed = xp.ascontiguousarray(packed)
    if packed.dtype != dtype:
        packed = packed.astype(dtype)
    if packed.size != int(np.prod(lead, dtype=np.int64)) * idx.size:
        raise ValueError(f"packed array of {packed.size} elements does not fit shape {tuple(shape)} at r_max={r_max}")
    out = xp.zeros(tuple(lead) + tuple(vol), dtype=dtype)
    wout = _words(out)
    per = wout.shape[-1]
    wpk = _words(packed).reshape(lead + (int(idx.size), per))
    wout.reshape(lead + (-1, per))[..., idx, :] = wpk
    return out
