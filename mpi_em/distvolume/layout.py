"""The stride decomposition: plane ownership (:class:`PlaneLayout`), the transpose of the distributed FFT
(:class:`Transpose`) and the small array helpers the other modules of :mod:`mpi_em.distvolume` share."""
from __future__ import annotations

import numpy as np

from ..backend import to_host


# ------------------------------------------------------------------------------------------ ownership
def owned_planes(npad: int, rank: int, size: int) -> np.ndarray:
    """Sorted int64 indices of the planes rank ``rank`` of ``size`` owns: z = rank (mod size), 0 <= z < npad.

    Empty when rank >= npad (more ranks than planes). Used for kz planes of Fourier data and, after the
    transpose of :func:`distributed_reconstruct`, for real-space y rows.
    """
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"rank {rank} is not in a communicator of size {size}")
    return plane_layout(npad, size).owned(rank)


class PlaneLayout:
    """The stride decomposition of Np planes over P ranks: rank ``r`` owns planes z = r, r + P, r + 2P, ...

    Built once per (Np, P) (:func:`plane_layout` caches it). ``planes[r]`` is rank r's owned planes (sorted
    int64), ``counts[r]`` their number; :meth:`owner` and :meth:`local` map a plane index (scalar or array, any
    array module) to its owner and to its position among the owner's planes; :meth:`displs` gives the
    displacements of per-rank blocks of ``per`` elements per plane. The same striding serves the real-space y
    rows after the transpose of :func:`distributed_reconstruct` (:meth:`transpose`).
    """

    def __init__(self, npad: int, size: int):
        if size < 1:
            raise ValueError(f"a communicator has at least one rank, got size {size}")
        self.npad, self.size = int(npad), int(size)
        self.nxh = self.npad // 2 + 1
        self.planes = [np.arange(r, self.npad, self.size, dtype=np.int64) for r in range(self.size)]
        self.counts = np.array([p.size for p in self.planes], dtype=np.int64)
        self._transposes: dict = {}

    def owned(self, rank: int) -> np.ndarray:
        if not 0 <= rank < self.size:
            raise ValueError(f"rank {rank} is not in a communicator of size {self.size}")
        return self.planes[rank]

    def owner(self, z):
        """Rank owning plane(s) ``z``."""
        return z % self.size

    def local(self, z):
        """Position of plane(s) ``z`` among their owner's planes."""
        return z // self.size

    @property
    def max_owned(self) -> int:
        return int(self.counts.max()) if self.size else 0

    def sizes(self, per: int = 1) -> list[int]:
        """Elements of each rank's block: owned planes x ``per``."""
        return [int(c) * int(per) for c in self.counts]

    def displs(self, per: int = 1) -> list[int]:
        return _displs(self.sizes(per))

    def transpose(self, box: int, pad: int, r_max: float) -> "Transpose":
        """The kz-plane -> y-row transpose of the distributed inverse FFT for (box, pad, r_max), built once."""
        key = (int(box), int(pad), float(r_max))
        if key not in self._transposes:
            self._transposes[key] = Transpose(self, *key)
        return self._transposes[key]


class Transpose:
    """What the distributed inverse FFT of :func:`distributed_reconstruct` sends where, for one (box, pad, r_max).

    Only what can be non-zero and is kept travels: the kz planes inside the band |kz| <= Rp = pad (r_max + 1/2)
    (``band``; ``own_band[r]``: positions of rank r's band planes among its owned planes, ``band_planes[r]``
    their kz), the columns kx < ``ncol``, and the y rows inside the final crop (``rows_to[r]``: the full y rows
    rank r receives, ``crop_rows[r]``: their rows in the cropped box; ``src``: the full index each cropped
    index reads after fftshift).
    """

    def __init__(self, layout: PlaneLayout, box: int, pad: int, r_max: float):
        npad, size = layout.npad, layout.size
        if npad != pad * box:
            raise ValueError(f"layout of {npad} planes does not match pad {pad} x box {box}")
        self.layout, self.box = layout, box
        rp = pad * (r_max + 0.5)
        k = np.abs(np.fft.fftfreq(npad, d=1.0 / npad))
        self.band = k <= rp
        self.ncol = min(layout.nxh, int(np.floor(rp)) + 1)
        self.own_band = [np.flatnonzero(self.band[p]) for p in layout.planes]
        self.band_planes = [p[self.band[p]] for p in layout.planes]
        # fftshift + crop: cropped index i of an axis reads full index (o + i + Np/2) mod Np
        o = (npad - box) // 2
        self.src = (np.arange(o, o + box) + npad // 2) % npad
        crop = [(p - o - npad // 2) % npad for p in layout.planes]       # crop row of each owned y
        keep = [np.flatnonzero(c < box) for c in crop]
        self.crop_rows = [crop[s][keep[s]] for s in range(size)]
        self.rows_to = [layout.planes[s][keep[s]] for s in range(size)]
        self.send_rows = np.concatenate(self.rows_to).astype(np.int64)  # y rows in destination order

    def counts(self, rank: int, nv: int) -> tuple[list[int], list[int]]:
        """Float64 elements rank ``rank`` sends to / receives from each rank in the transpose of ``nv`` volumes."""
        size = self.layout.size
        per = nv * self.ncol * 2
        send = [int(self.rows_to[d].size) * self.own_band[rank].size * per for d in range(size)]
        recv = [int(self.rows_to[rank].size) * self.own_band[s].size * per for s in range(size)]
        return send, recv


_LAYOUTS: dict = {}


def plane_layout(npad: int, size: int) -> PlaneLayout:
    """The (cached) :class:`PlaneLayout` of ``npad`` planes over ``size`` ranks."""
    key = (int(npad), int(size))
    if key not in _LAYOUTS:
        _LAYOUTS[key] = PlaneLayout(*key)
    return _LAYOUTS[key]


def _real_dtype(dtype) -> np.dtype:
    return np.zeros(0, dtype).real.dtype


def _complex_dtype(dtype) -> np.dtype:
    return np.result_type(dtype, np.complex64)


def _displs(counts) -> list[int]:
    out, acc = [], 0
    for c in counts:
        out.append(acc)
        acc += int(c)
    return out


def _as_real_host(a) -> np.ndarray:
    """Contiguous host copy of ``a``; complex arrays are viewed as interleaved real (shape[-1] doubled)."""
    h = np.ascontiguousarray(to_host(a))
    if np.iscomplexobj(h):
        h = h.view(_real_dtype(h.dtype))
    return h


def _wrapped(idx: np.ndarray, n: int) -> np.ndarray:
    """Signed frequency of FFT-layout indices (same rule as mpi_em.codec: i < n/2 -> i, else i - n)."""
    return np.where(idx < n / 2, idx, idx - n)


def _ball_index(planes: np.ndarray, npad: int, nxh: int, r: float) -> np.ndarray:
    """Flat indices into a (len(planes), npad, nxh) chunk of the voxels with |k| <= r (padded-grid units)."""
    kz = _wrapped(planes, npad).astype(np.float64)
    ky = _wrapped(np.arange(npad), npad).astype(np.float64)
    kx = np.arange(nxh, dtype=np.float64)
    r2 = kz[:, None, None] ** 2 + ky[None, :, None] ** 2 + kx[None, None, :] ** 2
    return np.flatnonzero(r2.ravel() <= float(r) * float(r))


def _check_layout(shape, npad=None) -> tuple[int, int]:
    if len(shape) < 3 or shape[-2] != (npad if npad is not None else shape[-3]) or \
            shape[-1] != shape[-2] // 2 + 1:
        raise ValueError(f"expected (..., Np, Np, Np//2+1) FFT-layout arrays, got shape {tuple(shape)}")
    return int(shape[-2]), int(shape[-1])
