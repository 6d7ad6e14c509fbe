"""References in Fourier space, 2D (class averages, rotated in plane) or 3D (volumes, central slices).

One interface for the E-step and the M-step: ``project(mats, vol_index, geom)`` and
``insert(acc, mats, vol_index, data, weights, geom)``, where ``mats`` are (..., d, d) rotations (d = 2 or 3).
"""
from __future__ import annotations

import numpy as np

from ..backend import xp_of
from ..fourier import CentredVolumes, SliceGeometry, backproject, project, volume_fft
from ..fourier2d import backproject2d, plane_fft, project2d
from ..geometry import euler_to_matrix, matrix_to_euler
from ..sampling import orientation_grid, psi_angles, rotation_vector_to_matrix


class References:
    """V references (maps (V, N, N[, N]) real, on xp) prepared for projection. ``single`` (3D): their Fourier
    volumes in complex64 (half the bytes; the projectors sample them in single precision) instead of
    complex128. ``volumes``: the indices of ``maps`` among all the job's references (``n_total`` of them), where a
    rank holds only the sets its particles use; ``project`` takes the job's indices and finds the rank's own.
    ``power_r_max``: also ``power``, the references' power per shell within that radius (host (V, n_shells),
    :func:`mpi_em.em.model.reference_power`), the signal prior of a classification. ``reach`` (3D, CPU ranks): the
    padded reach of the largest r_max they will be projected at; only that part is re-laid for the CPU projector
    (:class:`mpi_em.fourier.CentredVolumes`)."""

    def __init__(self, maps, dim: int, pad: int = 2, mask=None, single: bool = False, volumes=None,
                 n_total: int | None = None, power_r_max: float | None = None, reach: float | None = None):
        xp = xp_of(maps)
        self.dim, self.pad = dim, pad
        self.volumes = None if volumes is None else np.asarray(volumes, dtype=np.int64)
        self.slot = None
        if self.volumes is not None:  # job index -> slot here (-1: not held by this rank)
            slot = np.full(int(n_total if n_total is not None else self.volumes.max() + 1), -1, dtype=np.int64)
            slot[self.volumes] = np.arange(self.volumes.size)
            self.slot = slot if xp is np else xp.asarray(slot)
        self.box = maps.shape[-1]
        m = maps if mask is None else maps * mask
        self.centred = None
        self.power = None
        if dim == 3:
            npad = pad * self.box
            out = xp.empty((maps.shape[0], npad, npad, npad // 2 + 1), dtype=xp.complex64) if single else None
            self.F = volume_fft(m, pad, out=out)  # each volume transformed in its place (no list, then a copy)
        else:
            self.F = plane_fft(m, pad)
        if power_r_max is not None:  # RELION's classification prior, before CPU ranks re-lay 3D volumes
            from .model import reference_power

            self.power = reference_power(self.F, self.box, pad, power_r_max)
        if dim == 3 and xp is np:  # CPU ranks: the centred layout's projector (GPUs: the fused kernel on self.F)
            self.centred, self.F = CentredVolumes(self.F, reach=reach), None
        self.n = maps.shape[0]

    def project(self, mats, vol_index, geom: SliceGeometry):
        lead = mats.shape[:-2]
        if self.slot is not None:  # the job's volume numbers -> this rank's slots, on the slots' module
            vol_index = self.slot[xp_of(self.slot).asarray(vol_index)]
        if self.centred is not None:
            return self.centred.project(mats, geom, vol_index=np.broadcast_to(np.asarray(vol_index), lead))
        xp = xp_of(self.F)
        vi = xp.broadcast_to(xp.asarray(vol_index), lead).reshape(-1)
        if self.dim == 3:
            out = project(self.F, mats.reshape(-1, 3, 3), geom, vol_index=vi)
        else:
            out = project2d(self.F, mats.reshape(-1, 2, 2), geom, plane_index=vi)
        return out.reshape(lead + (geom.m,))


def insert(F_acc, W_acc, dim: int, mats, vol_index, data, weights, geom: SliceGeometry) -> None:
    """Back-project rows (n, m) with rotations (n, d, d) into accumulator stacks (V, ...)."""
    if dim == 3:
        backproject(F_acc, W_acc, mats, data, weights, geom, vol_index=vol_index)
    else:
        backproject2d(F_acc, W_acc, mats, data, weights, geom, plane_index=vol_index)


# ------------------------------------------------------------------------------------ pose sets
def rotation_2d(psi_deg, xp=np):
    """(n, 2, 2): the in-plane block of RELION's Euler matrix for psi (rot = tilt = 0)."""
    return euler_to_matrix(0.0, 0.0, psi_deg, xp=xp)[:, :2, :2]


def angles_from_mats(mats, dim: int, xp=np):
    """(n, d, d) -> (rot, tilt, psi) in degrees (2D: rot = tilt = 0)."""
    if dim == 3:
        return matrix_to_euler(mats, xp=xp)
    psi = xp.rad2deg(xp.arctan2(-mats[:, 1, 0], mats[:, 0, 0]))
    z = xp.zeros_like(psi)
    return z, z, psi


def global_grid(dim: int, order: int, sym: str, xp, psi_step: float | None = None, perturb_deg: float = 0.0):
    """The shared pose grid of a global search: (C, d, d), every pose right-multiplied by the perturbation
    rotation of ``perturb_deg`` (:func:`perturbation_rotation`; 2D: psi + perturb_deg)."""
    if dim == 3:
        A = orientation_grid(order, sym)[0]
    else:
        step = psi_step if psi_step else 360.0 / len(psi_angles(order))
        A = rotation_2d(np.arange(0.0, 360.0, step))
    if perturb_deg:
        A = A @ perturbation_rotation(dim, perturb_deg)
    return xp.asarray(A)


def perturbation_rotation(dim: int, angle_deg: float) -> np.ndarray:
    """The rotation that perturbs a pose grid by ``angle_deg`` (right-multiplied, A' = A @ R, as RELION's
    getOrientations): 3D, euler_to_matrix(a, a, a); 2D, the in-plane rotation of psi = a (:func:`rotation_2d`)."""
    if dim == 3:
        return euler_to_matrix(angle_deg, angle_deg, angle_deg)[0]
    return rotation_2d(np.asarray([angle_deg]))[0]


def fine_offsets(dim: int, step_deg: float, xp):
    """Small rotations that oversample a coarse cell of spacing ``step_deg`` once (RELION's oversampling by
    one HEALPix order): 3D, the 8 sub-cell centres, rotation vectors {-1, +1}^3 x step/4; 2D, psi +- step/4."""
    if dim == 3:
        g = np.array([[x, y, z] for z in (-1, 1) for y in (-1, 1) for x in (-1, 1)], dtype=np.float64)
        return xp.asarray(rotation_vector_to_matrix(np.deg2rad(step_deg / 4.0) * g))
    return rotation_2d(xp.asarray([-step_deg / 4.0, step_deg / 4.0]), xp)


def local_grid(dim: int, radius_steps: float) -> np.ndarray:
    """Integer offsets (L, 3) (3D: rotation vectors in steps) or (L,) (2D: psi steps) within ``radius_steps`` of
    0, nearest first."""
    r = int(np.floor(radius_steps))
    c = np.arange(-r, r + 1)
    if dim == 2:
        return c[np.argsort(np.abs(c), kind="stable")]
    g = np.stack(np.meshgrid(c, c, c, indexing="ij"), -1).reshape(-1, 3)
    g = g[(g ** 2).sum(1) <= radius_steps ** 2 + 1e-9]
    return g[np.argsort((g ** 2).sum(1), kind="stable")]


def local_offsets(dim: int, step_deg: float, grid, xp):
    """Small rotations (L, d, d) of the :func:`local_grid` ``grid`` (offsets in steps of ``step_deg`` around the
    identity), in its order."""
    g = np.asarray(grid)
    if dim == 2:
        return rotation_2d(xp.asarray(g * step_deg), xp)
    return xp.asarray(rotation_vector_to_matrix(np.deg2rad(step_deg) * g.astype(np.float64)))


def compose(small, A):
    """small (k, d, d) applied on the left of A (n, ..., d, d) -> (n, ..., k, d, d) = small_k @ A."""
    xp = xp_of(A)
    return xp.einsum("kij,...jl->...kil", small, A)
