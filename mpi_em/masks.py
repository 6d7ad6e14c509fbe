"""Soft spherical masks (cosine edge), for 2D images and 3D volumes."""
from __future__ import annotations

import numpy as np


def soft_sphere(box: int, radius: float, width: float = 3.0, ndim: int = 3, xp=np, dtype=np.float32):
    """1 inside ``radius`` (pixels from the centre N//2), raised-cosine fall-off over ``width``, 0 outside."""
    c = xp.arange(box, dtype=xp.float64) - box // 2
    grids = xp.meshgrid(*([c] * ndim), indexing="ij")
    r = xp.sqrt(sum(g * g for g in grids))
    m = xp.where(r <= radius, 1.0, 0.0)
    if width > 0:
        edge = (r > radius) & (r < radius + width)
        m = xp.where(edge, 0.5 + 0.5 * xp.cos(np.pi * (r - radius) / width), m)
    return m.astype(dtype)
