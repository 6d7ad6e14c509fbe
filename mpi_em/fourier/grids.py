"""Frequency grids of the rfft layouts: integer frequencies, radii |k|, the shell of a radius, box checks."""
from __future__ import annotations

import numpy as np

from ..backend import xp_of


def freq_grid_2d(box: int, xp=np):
    """(ky (box,1), kx (1,box//2+1)) integer frequencies (float64) of the rfft2 grid."""
    ky = xp.fft.fftfreq(box, d=1.0 / box).reshape(-1, 1)
    kx = xp.arange(box // 2 + 1, dtype=xp.float64).reshape(1, -1)
    return ky, kx


def radius_2d(box: int, xp=np):
    """|k| (image pixels, float64) on the (box, box//2+1) rfft2 grid."""
    ky, kx = freq_grid_2d(box, xp)
    return xp.sqrt(ky * ky + kx * kx)


def radius_3d(n: int, xp=np):
    """|k| (float64, in units of the grid's frequency step) on the (n, n, n//2+1) rfftn grid."""
    kz = xp.fft.fftfreq(n, d=1.0 / n).reshape(-1, 1, 1)
    ky = kz.reshape(1, -1, 1)
    kx = xp.arange(n // 2 + 1, dtype=xp.float64).reshape(1, 1, -1)
    return xp.sqrt(kz * kz + ky * ky + kx * kx)


def default_r_max(box: int) -> int:
    """The largest frequency radius (image pixels) a box's slices use by default: N/2 - 1 (every stencil inside the
    padded grid)."""
    return box // 2 - 1


def check_box(box: int) -> None:
    """ValueError unless the box (pixels) is even and at least 8."""
    if box % 2 or box < 8:
        raise ValueError(f"box size must be even and >= 8, got {box}")


def shell_index(r, last: int | None = None):
    """Integer shell round(|k|) of frequency radii ``r`` (image pixels, >= 0; any shape, NumPy or CuPy): the one
    rounding rule of every per-shell sum (FSC, noise spectrum, tau^2). With ``last``, radii beyond it go to shell
    ``last`` (the tau^2 table's end, or an "outside" bin)."""
    xp = xp_of(r)
    sh = xp.rint(r).astype(xp.int64)
    return sh if last is None else xp.minimum(sh, last)

