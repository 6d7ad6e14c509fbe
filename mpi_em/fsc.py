"""Fourier shell correlation and the resolution at a threshold."""
from __future__ import annotations

import numpy as np

from .backend import to_host, xp_of
from .fourier import radius_3d, shell_index


def fsc(vol1, vol2, single: bool = False):
    """FSC per integer shell 0..N/2 of two real (N, N, N) volumes -> numpy float64 array (N//2 + 1,).
    ``single``: the transforms in single precision (complex64: a quarter of the memory of float64 copies and
    their transforms, for large boxes on a GPU; the curve to ~1e-6)."""
    xp = xp_of(vol1, vol2)
    dt = xp.float32 if single else xp.float64
    F1 = xp.fft.rfftn(vol1.astype(dt, copy=False))
    return fsc_fourier(F1, xp.fft.rfftn(vol2.astype(dt, copy=False)))


def fsc_fourier(F1, F2):
    """FSC per integer shell 0..N/2 of two (N, N, N//2+1) rfftn-layout arrays -> numpy float64 (N//2 + 1,)."""
    xp = xp_of(F1, F2)
    n = F1.shape[-3]
    shell = shell_index(radius_3d(n, xp)).ravel()
    keep = shell <= n // 2
    shell = shell[keep]
    nb = n // 2 + 1
    num = xp.bincount(shell, weights=(F1 * xp.conj(F2)).real.ravel()[keep], minlength=nb)
    d1 = xp.bincount(shell, weights=(xp.abs(F1) ** 2).ravel()[keep], minlength=nb)
    d2 = xp.bincount(shell, weights=(xp.abs(F2) ** 2).ravel()[keep], minlength=nb)
    den = xp.sqrt(d1 * d2)
    out = xp.where(den > 0, num / xp.where(den > 0, den, 1.0), 0.0)
    return to_host(out)[:nb]


def shell_frequencies(box: int, pixel_size: float) -> np.ndarray:
    """Spatial frequency (1/Å) of each integer shell 0..N/2."""
    return np.arange(box // 2 + 1) / (box * pixel_size)


def resolution_at(curve, box: int, pixel_size: float, threshold: float = 0.143) -> float:
    """Resolution (Å) where the FSC first falls below ``threshold`` (linear interpolation between shells).

    Shell 0 is skipped. Returns the Nyquist resolution (2 * pixel size) if it never falls below.
    """
    curve = np.asarray(curve, dtype=np.float64)
    freqs = shell_frequencies(box, pixel_size)
    for i in range(1, len(curve)):
        if curve[i] < threshold:
            f0, f1, c0, c1 = freqs[i - 1], freqs[i], curve[i - 1], curve[i]
            f = f1 if c0 == c1 else f0 + (c0 - threshold) * (f1 - f0) / (c0 - c1)
            return float(1.0 / f) if f > 0 else float("inf")
    return float(2.0 * pixel_size)
