"""Stride-distributed Fourier volume: each rank holds only the kz planes it owns.

The all-reduce design keeps a full padded accumulator pair (F complex, W real, each (Np, Np, Np//2+1), FFT
layout [kz, ky, kx], see :mod:`mpi_em.fourier`) on every rank and sums it with ``Allreduce``. Here rank ``r``
of ``P`` owns the kz planes ``z = r, r + P, r + 2P, ...`` (:func:`owned_planes`; any P, a rank may own no
plane when P > Np), so a rank holds about 1/P of the volume:

- :func:`reduce_scatter_planes`: full local partial sums -> the summed planes a rank owns
  (``Reduce_scatter``, or compressed chunks through ``Alltoallv`` summed in rank order).
- :class:`PlaneOwnerAccumulator`: streaming insertion for a memory budget; each batch's stencil
  contributions travel to the owner of their kz plane (``Alltoallv``) and are scatter-added there, so no
  rank ever holds a full padded volume. **Collective per batch**: every rank must call :meth:`add`
  (or :meth:`add_empty`) the same number of times. :meth:`~PlaneOwnerAccumulator.backproject_points` routes the
  in-ball points instead (to the owners of the two planes each stencil touches; the EM jobs' owned accumulators).
- :func:`distributed_reconstruct`: Hermitian merge of the kx = 0 plane, regularised division and a
  distributed inverse real 3D FFT (one ``Alltoallv`` transpose from kz-plane to y-row ownership), then the
  cropped, gridding-corrected box^3 map is ``Allgatherv``-ed to every rank. Equal to
  :func:`mpi_em.fourier.reconstruct` applied to each volume of the summed full arrays, to float64 rounding.
- :func:`volume_bytes_per_rank`: the bytes each rank holds in either design (for benchmarks).

The decomposition itself is one object, :class:`PlaneLayout` (built once per (Np, P) by :func:`plane_layout`):
the owner and local index of a plane, each rank's owned planes, counts and displacements, and the transpose of
the distributed FFT (:meth:`PlaneLayout.transpose`, one per (box, pad, r_max)). Every function here takes its
rank arithmetic from it.

NumPy and CuPy arrays share one code path (:func:`mpi_em.backend.xp_of`); MPI always moves host copies.
"""
from __future__ import annotations

import math

import numpy as np

from .backend import scatter_add, to_host, xp_of
from .codec import compress_for_send, decompress_received
from .distributed import RankFailed
from .fourier import (_trilinear_stencil, default_r_max, gridding_factor, reconstruction_ball, regularised_denominator,
                      soft_mask_outside)

__all__ = [
    "PlaneLayout",
    "plane_layout",
    "owned_planes",
    "reduce_scatter_planes",
    "PlaneOwnerAccumulator",
    "distributed_reconstruct",
    "volume_bytes_per_rank",
]


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


# --------------------------------------------------------------------------------- reduce-scatter
def reduce_scatter_planes(comm, buf, compress: bool = False, r_max_padded=None, *, level: int = 1,
                          check: bool = True, stats: dict | None = None):
    """Sum ``buf`` (..., Np, Np, Np//2+1) over ranks; return the owned planes (..., n_owned, Np, Np//2+1).

    Collective. ``buf`` is this rank's full partial sum (NumPy or CuPy, real or complex; leading axes are
    volumes, e.g. the two half sets); the result has the same dtype and module.

    - ``compress=False``: one ``Reduce`` per volume and owner on a host copy of that owner's planes (the bytes
      of a ``Reduce_scatter``, with a staging copy of 1/P of one volume). The summation order is MPI's. With
      ``r_max_padded`` only the cube |kx|, |ky|, |kz| <= ceil(r_max_padded) around the origin is sent (the
      data of a current size r: (2R+1)^2 (R+1) of Np^2 (Np/2+1) voxels); every voxel outside must be zero
      (checked collectively unless ``check=False``, for callers whose insertion geometry guarantees it).
    - ``compress=True``: each owner's chunk is compressed with :mod:`mpi_em.codec` (byte shuffle + zstd,
      lossless) and sent with one ``Alltoallv`` of bytes; with ``r_max_padded`` (radius in padded-grid
      voxels) only the voxels with |k| <= r_max_padded are packed, and every voxel outside must be exactly
      zero (checked collectively, ``ValueError`` on every rank otherwise, unless ``check=False``: then
      outside voxels are dropped and the owned result is zero there). The received chunks are summed
      locally in rank order 0..P-1, so the result is deterministic; it equals the uncompressed result to
      float rounding (different summation order), not bit for bit.

    ``stats`` (a dict, optional) receives ``bytes_sent`` (bytes this rank handed to other ranks: the full local
    buffer for ``Reduce_scatter``, the compressed chunks for the other owners with compression) and
    ``bytes_raw`` (the local buffer's size).
    """
    from mpi4py import MPI

    xp = xp_of(buf)
    npad, nxh = _check_layout(buf.shape)
    lead = tuple(buf.shape[:-3])
    size, rank = comm.size, comm.rank
    layout = plane_layout(npad, size)
    plan = layout.planes
    mine = plan[rank]
    if stats is not None:
        stats.update(bytes_raw=int(buf.nbytes), bytes_sent=int(buf.nbytes))
    if compress:
        return _reduce_scatter_compressed(comm, buf, layout, r_max_padded, level, check, stats)
    if size == 1:  # one owner of every plane: nothing to send, no host staging of device buffers
        if stats is not None:
            stats["bytes_sent"] = 0
        return buf.copy()

    nv = int(np.prod(lead, dtype=np.int64))
    flat = buf.reshape((nv, npad, npad, nxh))
    R = None if r_max_padded is None else int(np.ceil(r_max_padded))
    if R is not None and R < npad // 2:
        return _reduce_scatter_cube(comm, flat, layout, R, check, stats).reshape(lead + (mine.size, npad, nxh))
    # one Reduce per (volume, owner) on that owner's planes only: the bytes of one Reduce_scatter, with a host
    # staging copy of 1/P of one volume instead of the whole buffer, received straight into the result
    out = np.empty((nv, mine.size, npad, nxh), dtype=buf.dtype)
    real = _real_dtype(buf.dtype) if np.iscomplexobj(out) else out.dtype
    for v in range(nv):
        for d in range(size):
            if plan[d].size == 0:
                continue
            chunk = _as_real_host(flat[v][xp.asarray(plan[d])])
            recv = out[v].view(real) if d == rank else None
            comm.Reduce(chunk, recv, op=MPI.SUM, root=d)
            del chunk
    out = out.reshape(lead + (mine.size, npad, nxh))
    return out if xp is np else xp.asarray(out)


def _reduce_scatter_cube(comm, flat, layout: PlaneLayout, R, check, stats=None):
    """Plain reduce-scatter of the cube |k_i| <= R only (see :func:`reduce_scatter_planes`): flat (V, Np, Np,
    Np//2+1) -> owned planes (V, n_owned, Np, Np//2+1), zero outside the cube."""
    from mpi4py import MPI

    xp = xp_of(flat)
    nv, npad, nxh = flat.shape[0], flat.shape[1], flat.shape[-1]
    rank = comm.rank
    plan = layout.planes
    near = np.flatnonzero(np.abs(_wrapped(np.arange(npad), npad)) <= R)  # planes / rows inside the cube
    if check:
        inside = np.zeros((npad, npad, nxh), dtype=bool)
        inside[np.ix_(near, near, np.arange(R + 1))] = True
        bad = bool((flat[:, xp.asarray(~inside)] != 0).any())
        if comm.allreduce(bad, op=MPI.LOR):
            raise ValueError(f"reduce_scatter_planes(r_max_padded -> cube {R}): non-zero data outside the cube on "
                             "some rank; sending the cube would lose it")
    mine = plan[rank]
    out = xp.zeros((nv, mine.size, npad, nxh), dtype=flat.dtype)  # on the buffer's device: only the cube moves
    rows = xp.asarray(near)
    sent = 0
    for d in range(comm.size):
        pl = plan[d][np.isin(plan[d], near)]
        if pl.size == 0:
            continue
        for v in range(nv):
            chunk = _as_real_host(flat[v][xp.asarray(pl)][:, rows, :R + 1])
            recv = np.empty_like(chunk) if d == rank else None
            comm.Reduce(chunk, recv, op=MPI.SUM, root=d)
            sent += chunk.nbytes  # as the full path counts its buffer: every chunk handed to a Reduce
            if d == rank:
                if np.iscomplexobj(out):
                    recv = recv.view(out.dtype)
                loc = xp.asarray(layout.local(pl))
                out[v][loc[:, None, None], rows[None, :, None], xp.arange(R + 1)[None, None, :]] = xp.asarray(recv)
    if stats is not None:
        stats["bytes_sent"] = int(sent)
    return out


def _reduce_scatter_compressed(comm, buf, layout: PlaneLayout, r_max_padded, level, check, stats=None):
    from mpi4py import MPI

    xp = xp_of(buf)
    npad, nxh = buf.shape[-2], buf.shape[-1]
    lead = tuple(buf.shape[:-3])
    size, rank = comm.size, comm.rank
    plan = layout.planes
    mine = plan[rank]

    if r_max_padded is not None and check:
        full_idx = _ball_index(np.arange(npad), npad, nxh, r_max_padded)
        outside = np.ones(npad * npad * nxh, dtype=bool)
        outside[full_idx] = False
        flat = buf.reshape(lead + (-1,))
        bad = bool((flat[..., xp.asarray(outside)] != 0).any())
        if comm.allreduce(bad, op=MPI.LOR):
            raise ValueError(f"reduce_scatter_planes(compress=True, r_max_padded={r_max_padded}): non-zero "
                             "data outside the ball on some rank; packing would lose it (check=False drops it)")

    def chunk(r):
        planes = plan[r]
        c = buf[..., xp.asarray(planes), :, :].reshape(lead + (-1,))
        if r_max_padded is None:
            return xp.ascontiguousarray(c)
        return xp.ascontiguousarray(c[..., xp.asarray(_ball_index(planes, npad, nxh, r_max_padded))])

    own = None
    blobs = []
    for d in range(size):
        if d == rank:
            own = chunk(d)  # stays here, uncompressed
            blobs.append(np.zeros(0, np.uint8))
        elif plan[d].size == 0:
            blobs.append(np.zeros(0, np.uint8))
        else:
            blobs.append(compress_for_send(chunk(d), None, level))
    scounts = [int(b.size) for b in blobs]
    if stats is not None:
        stats["bytes_sent"] = int(sum(scounts))
    rcounts = [int(c) for c in comm.alltoall(scounts)]
    sendbuf = np.concatenate(blobs) if blobs else np.zeros(0, np.uint8)
    recvbuf = np.empty(sum(rcounts), dtype=np.uint8)
    sd, rd = _displs(scounts), _displs(rcounts)
    comm.Alltoallv([sendbuf, (scounts, sd), MPI.BYTE], [recvbuf, (rcounts, rd), MPI.BYTE])

    acc = None
    if mine.size:
        for s in range(size):  # fixed order -> deterministic sum
            part = own if s == rank else decompress_received(recvbuf[rd[s]:rd[s] + rcounts[s]], xp=xp)
            acc = part.copy() if acc is None else acc + part
    if r_max_padded is None:
        if acc is None:
            return xp.zeros(lead + (0, npad, nxh), dtype=buf.dtype)
        return acc.reshape(lead + (mine.size, npad, nxh))
    out = xp.zeros(lead + (mine.size, npad, nxh), dtype=buf.dtype)
    if mine.size:
        out.reshape(lead + (-1,))[..., xp.asarray(_ball_index(mine, npad, nxh, r_max_padded))] = acc
    return out


# ------------------------------------------------------------------------------ streaming insertion
#: a routed point of :meth:`PlaneOwnerAccumulator.backproject_points`: volume, padded-grid coordinates, value, weight
_POINT_REC = np.dtype([("k", np.int64), ("c", np.float64, (3,)), ("v", np.complex128), ("w", np.float64)])
#: received points per chunk of stencils in :meth:`PlaneOwnerAccumulator.backproject_points`
POINT_CHUNK = 1 << 14

class PlaneOwnerAccumulator:
    """Owned kz planes of F (n_vol, n_owned, Np, Nxh) complex and W (same shape, real) on module ``xp``.

    Streaming insertion: :meth:`add` takes a batch's stencil (flat indices into the full (Np, Np, Nxh) grid
    with the F and W values that :func:`mpi_em.fourier.backproject` would scatter-add there), sends each
    contribution to the owner of its plane kz = flat_idx // (Np * Nxh) with one ``Alltoallv`` and
    scatter-adds what arrives (in rank order). A rank never holds more than its owned planes plus one
    batch's stencil, so reconstructions whose full padded volume exceeds one rank's memory are possible.

    **add is collective.** Every rank must call :meth:`add` / :meth:`add_empty` / :meth:`backproject` the
    same number of times. With unequal numbers of batches per rank, loop over
    ``n_batches_all = comm.allreduce(n_local_batches, op=MPI.MAX)`` and call :meth:`add_empty` once local
    data has run out::

        n_all = comm.allreduce(len(batches), op=MPI.MAX)
        for i in range(n_all):
            if i < len(batches):
                acc.backproject(half_index, A, data, weights, geom)   # or acc.add(...)
            else:
                acc.add_empty()

    Invalid input on one rank (index or volume out of range) raises :class:`mpi_em.distributed.RankFailed`
    on every rank (the check travels with the size exchange), so nobody hangs.
    """

    def __init__(self, comm, geom_shape, n_vol: int = 2, dtype=np.complex128, xp=np):
        shape = tuple(getattr(geom_shape, "vol_shape", geom_shape))
        self.npad, self.nxh = _check_layout(shape)
        if len(shape) != 3:
            raise ValueError(f"geom_shape must be (Np, Np, Np//2+1), got {shape}")
        self.comm, self.xp, self.n_vol = comm, xp, int(n_vol)
        self.size, self.rank = comm.size, comm.rank
        self.layout = plane_layout(self.npad, self.size)
        self.planes = self.layout.owned(self.rank)
        cdt = _complex_dtype(dtype)
        rdt = _real_dtype(cdt)
        self.F = xp.zeros((self.n_vol, self.planes.size, self.npad, self.nxh), dtype=cdt)
        self.W = xp.zeros(self.F.shape, dtype=rdt)
        self._rec = np.dtype([("i", np.int64), ("f", cdt), ("w", rdt)])
        self._mpi_type = None
        self.n_calls = 0
        self.n_sent = 0      # contributions this rank sent (incl. to itself)
        self.n_received = 0

    @property
    def plane_size(self) -> int:
        return self.npad * self.nxh

    @property
    def nbytes(self) -> int:
        return int(self.F.nbytes + self.W.nbytes)

    def _type(self):
        if self._mpi_type is None:
            from mpi4py import MPI

            self._mpi_type = MPI.BYTE.Create_contiguous(self._rec.itemsize).Commit()
        return self._mpi_type

    def free(self) -> None:
        """Free the MPI datatypes (optional; call before MPI finalisation if the object outlives it)."""
        if self._mpi_type is not None:
            self._mpi_type.Free()
            self._mpi_type = None
        if getattr(self, "_mpi_point_type", None) is not None:
            self._mpi_point_type.Free()
            self._mpi_point_type = None

    def add_empty(self) -> None:
        """Take part in one :meth:`add` round without contributing (rank out of batches)."""
        self.add(0, np.zeros(0, np.int64), None, None)

    def fail(self, error) -> None:
        """Take part in one :meth:`add` round as a failed rank: every rank raises :class:`RankFailed` with
        ``error``'s message (use when reading or preparing this rank's batch failed), so nobody hangs."""
        self.add(0, np.zeros(0, np.int64), None, None, error=error)

    def add(self, vol_index, flat_idx, values_F=None, values_W=None, *, error=None) -> None:
        """Collective: route stencil contributions to their plane owners and accumulate.

        ``flat_idx``: int array of flat indices into the full (Np, Np, Nxh) grid; ``values_F`` (complex) and
        ``values_W`` (real) of the same shape (either may be None: nothing added to that array);
        ``vol_index``: int, or an int array broadcastable to ``flat_idx`` (e.g. the half set per image).
        """
        xp = self.xp
        P, ps = self.size, self.plane_size
        err, err_code = None, 0
        n = 0
        try:
            if error is not None:
                raise error if isinstance(error, BaseException) else RuntimeError(str(error))
            idx = xp.asarray(flat_idx).reshape(-1).astype(xp.int64, copy=False)
            n = int(idx.size)
            vi = xp.asarray(vol_index)
            vi = xp.broadcast_to(vi, xp.asarray(flat_idx).shape).reshape(-1).astype(xp.int64) if vi.ndim \
                else xp.full(n, int(vi), dtype=xp.int64)
            if n and (bool((idx < 0).any()) or bool((idx >= self.npad * ps).any())):
                raise ValueError(f"flat index outside the ({self.npad}, {self.npad}, {self.nxh}) grid")
            if n and (bool((vi < 0).any()) or bool((vi >= self.n_vol).any())):
                raise ValueError(f"volume index outside 0..{self.n_vol - 1}")
            kz = idx // ps
            dest = self.layout.owner(kz)
            n_own_dest = xp.asarray(self.layout.counts)[dest]
            local = (vi * n_own_dest + self.layout.local(kz)) * ps + idx % ps
            order = xp.argsort(dest, kind="stable") if xp is np else xp.argsort(dest)
            counts = np.bincount(to_host(dest), minlength=P).astype(np.int64)
            rec = np.zeros(n, dtype=self._rec)
            rec["i"] = to_host(local[order])
            if values_F is not None:
                rec["f"] = to_host(xp.asarray(values_F).reshape(-1)[order])
            if values_W is not None:
                rec["w"] = to_host(xp.asarray(values_W).reshape(-1)[order])
        except Exception as e:  # noqa: BLE001 - reported to every rank below
            from .errors import MpiEmError

            err = str(e) if isinstance(e, MpiEmError) else f"{type(e).__name__}: {e}"
            err_code = getattr(e, "exit_code", 1) or 1
            n = 0
            counts = np.zeros(P, np.int64)
            rec = np.zeros(0, dtype=self._rec)
        # size exchange doubles as failure agreement
        code = err_code if err is not None else 0
        got = self.comm.alltoall([(int(c), err, code) for c in counts])
        errs = [(s, m, c) for s, (_, m, c) in enumerate(got) if m is not None]
        if errs:
            raise RankFailed([f"rank {s}: {m}" for s, m, _ in errs], exit_code=max(c for _, _, c in errs))
        rcounts = [int(c) for c, _, _ in got]
        scounts = [int(c) for c in counts]
        recv = np.empty(sum(rcounts), dtype=self._rec)
        t = self._type()
        self.comm.Alltoallv([rec.view(np.uint8), (scounts, _displs(scounts)), t],
                            [recv.view(np.uint8), (rcounts, _displs(rcounts)), t])
        self.n_calls += 1
        self.n_sent += n
        self.n_received += int(recv.size)
        if recv.size:
            ridx = xp.asarray(np.ascontiguousarray(recv["i"]))
            scatter_add(self.F, ridx, xp.asarray(np.ascontiguousarray(recv["f"])))
            scatter_add(self.W, ridx, xp.asarray(np.ascontiguousarray(recv["w"])))

    def backproject(self, vol_index, A, data, weights, geom) -> None:
        """Collective :meth:`add` of :func:`mpi_em.fourier.backproject`'s stencil for one batch.

        ``A`` (n,3,3), ``data`` (n, m) complex, ``weights`` (n, m) real or None, ``vol_index`` int or (n,).
        """
        xp = self.xp
        idx, w, flip = _trilinear_stencil(geom.coords(A), geom.npad)
        data = xp.asarray(data)
        d = xp.where(flip, xp.conj(data), data)
        vF = d[..., None] * w
        vW = None if weights is None else xp.asarray(weights)[..., None] * w
        vi = np.asarray(to_host(vol_index))
        vi = int(vi) if vi.ndim == 0 else xp.asarray(vi).reshape(-1, 1, 1)
        self.add(vi, idx, vF, vW)

    def backproject_points(self, vol_index, A, data, weights, geom, *, error=None) -> None:
        """Collective, as :meth:`backproject`, but routing points instead of stencil corners: each in-ball point
        (its padded-grid coordinates, value and weight, 56 bytes) goes to the owners of the two kz planes its
        trilinear stencil touches; the owners build the stencils in chunks of :data:`POINT_CHUNK` points and keep
        the corners on their planes. The same contributions as :meth:`backproject` (to float rounding: other
        summation order), with ~1/5 of its memory per point. ``error``: take part as a failed rank (every rank
        raises :class:`RankFailed`)."""
        xp = self.xp
        P = self.size
        err, err_code = None, 0
        try:
            if error is not None:
                raise error if isinstance(error, BaseException) else RuntimeError(str(error))
            coords = geom.coords(A).reshape(-1, 3)
            n = int(coords.shape[0])
            vi = xp.asarray(vol_index)
            vi = xp.broadcast_to(vi.reshape(-1, 1), (vi.size, n // max(vi.size, 1))).reshape(-1) if vi.ndim \
                else xp.full(n, int(vi), dtype=xp.int64)
            if n and (bool((vi < 0).any()) or bool((vi >= self.n_vol).any())):
                raise ValueError(f"volume index outside 0..{self.n_vol - 1}")
            z0 = xp.floor(xp.where(coords[:, 0] < 0, -coords[:, 2], coords[:, 2])).astype(xp.int64)
            o0, o1 = self.layout.owner(z0 % self.npad), self.layout.owner((z0 + 1) % self.npad)
            sel = [to_host(xp.flatnonzero((o0 == d) | (o1 == d))) for d in range(P)]
            del z0, o0, o1
            counts = np.array([s.size for s in sel], dtype=np.int64)
            order = xp.asarray(np.concatenate(sel)) if P > 1 else None
            take = (lambda a: a[order]) if P > 1 else (lambda a: a)  # noqa: E731 - one owner: every point once
            rec = np.empty(int(counts.sum()), dtype=_POINT_REC)
            rec["k"] = to_host(take(vi))
            rec["c"] = to_host(take(coords))
            rec["v"] = to_host(take(xp.asarray(data).reshape(-1)))
            rec["w"] = 0.0 if weights is None else to_host(take(xp.asarray(weights).reshape(-1)))
            del coords, vi, order, sel
        except Exception as e:  # noqa: BLE001 - reported to every rank below
            from .errors import MpiEmError

            err = str(e) if isinstance(e, MpiEmError) else f"{type(e).__name__}: {e}"
            err_code = getattr(e, "exit_code", 1) or 1
            counts = np.zeros(P, np.int64)
            rec = np.zeros(0, dtype=_POINT_REC)
        got = self.comm.alltoall([(int(c), err, err_code if err is not None else 0) for c in counts])
        errs = [(s, m, c) for s, (_, m, c) in enumerate(got) if m is not None]
        if errs:
            raise RankFailed([f"rank {s}: {m}" for s, m, _ in errs], exit_code=max(c for _, _, c in errs))
        rcounts = [int(c) for c, _, _ in got]
        scounts = [int(c) for c in counts]
        recv = np.empty(sum(rcounts), dtype=_POINT_REC)
        t = self._point_type()
        self.comm.Alltoallv([rec.view(np.uint8), (scounts, _displs(scounts)), t],
                            [recv.view(np.uint8), (rcounts, _displs(rcounts)), t])
        del rec
        self.n_calls += 1
        self.n_sent += int(sum(scounts))
        self.n_received += int(recv.size)
        ps = self.plane_size
        n_own = int(self.planes.size)
        for a in range(0, recv.size, POINT_CHUNK):
            r = recv[a:a + POINT_CHUNK]
            idx, w, flip = _trilinear_stencil(xp.asarray(np.ascontiguousarray(r["c"])), self.npad)
            kz = idx // ps
            mine = self.layout.owner(kz) == self.rank
            local = (xp.asarray(r["k"])[:, None] * n_own + self.layout.local(kz)) * ps + idx % ps
            v = xp.asarray(r["v"])
            v = xp.where(flip, xp.conj(v), v)
            scatter_add(self.F, local[mine], (v[:, None] * w)[mine])
            scatter_add(self.W, local[mine], (xp.asarray(r["w"])[:, None] * w)[mine])
            del idx, w, flip, kz, mine, local, v

    def _point_type(self):
        if getattr(self, "_mpi_point_type", None) is None:
            from mpi4py import MPI

            self._mpi_point_type = MPI.BYTE.Create_contiguous(_POINT_REC.itemsize).Commit()
        return self._mpi_point_type

    def reconstruct(self, box: int, pad: int, r_max=None, **kw):
        """Collective :func:`distributed_reconstruct` of every volume -> (n_vol, box, box, box) on every rank."""
        return distributed_reconstruct(self.comm, self.F, self.W, box, pad, r_max, **kw)


# ---------------------------------------------------------------------------- distributed reconstruction
def _allgather_planes(comm, local, layout: PlaneLayout):
    """Allgatherv of per-rank plane blocks: ``local`` (n_mine, ...) float64 host -> full (Np, ...) host."""
    from mpi4py import MPI

    local = np.ascontiguousarray(local, dtype=np.float64)
    row = local.shape[1:]
    per = int(np.prod(row, dtype=np.int64))
    recv = np.empty(sum(layout.sizes(per)), dtype=local.dtype)
    comm.Allgatherv(local.reshape(-1), [recv, (layout.sizes(per), layout.displs(per)), MPI.DOUBLE])
    full = np.empty((layout.npad,) + row, dtype=local.dtype)
    full[np.concatenate(layout.planes)] = recv.reshape((-1,) + row)
    return full


def distributed_reconstruct(comm, F_own, W_own, box: int, pad: int = 2, r_max=None, tau2=None,
                            tau2_fudge: float = 1.0, min_weight: float = 1e-3, gridding: bool = True,
                            serial_shortcut: bool = True, mask_outside: bool = False):
    """Regularised division and distributed inverse FFT of owned planes -> real (..., box, box, box), every rank.

    Collective. ``F_own`` (..., n_owned, Np, Np//2+1) complex and ``W_own`` (same shape, real) are the summed
    planes this rank owns (:func:`owned_planes`, Np = pad * box). Each leading-axis volume gives the result of
    :func:`mpi_em.fourier.reconstruct` on that volume's full summed arrays (same formulas: Hermitian merge of
    the kx = 0 plane, division by max(W, min_weight * mean(W in ball)) or by W + 1/(tau2_fudge * tau2[shell]),
    zero outside its ball, irfftn, fftshift, crop, gridding correction, ``mask_outside``), to float64
    rounding (sums and FFTs in a different order). ``tau2``: (n_shell,) for every volume or (..., n_shell)
    per volume. Computed in float64/complex128; returns float64 on the module of ``F_own``. Inputs are not
    modified.

    Steps: merge (the kx = 0 plane, Np x Np per volume, all-gathered for the Friedel merge with the mirror
    plane -kz) -> divide (mean of W in the ball by allreduce, local regularised division) -> transpose (ifft
    along ky on owned kz planes, one ``Alltoallv`` to y rows, :meth:`PlaneLayout.transpose`) -> FFTs (ifft
    along kz, irfft along kx on the owned y rows, gridding correction of the rows inside the crop) -> gather
    (the box^3 map ``Allgatherv``-ed; with ``mask_outside`` every rank applies
    :func:`mpi_em.fourier.soft_mask_outside` to it, as the serial one). On one rank (``serial_shortcut``)
    :func:`mpi_em.fourier.reconstruct` works on the arrays' device instead.
    """
    xp = xp_of(F_own)
    npad = pad * box
    if npad % 2:
        raise ValueError(f"padded size pad*box = {npad} must be even")
    layout = plane_layout(npad, comm.size)
    n_own = layout.counts[comm.rank]
    nxh = layout.nxh
    r_max = default_r_max(box) if r_max is None else r_max
    lead = tuple(F_own.shape[:-3])
    if tuple(F_own.shape[-3:]) != (n_own, npad, nxh) or tuple(W_own.shape) != tuple(F_own.shape):
        raise ValueError(f"rank {comm.rank}: owned arrays must be (..., {n_own}, {npad}, {nxh}); got F "
                         f"{tuple(F_own.shape)}, W {tuple(W_own.shape)}")
    nv = int(np.prod(lead, dtype=np.int64))
    if tau2 is not None:
        tau2 = np.asarray(to_host(tau2), dtype=np.float64)
        tau2 = tau2.reshape(-1, tau2.shape[-1]) if tau2.ndim > 1 else tau2
    if comm.size == 1 and serial_shortcut:
        out = _serial_reconstruct(F_own.reshape((nv, npad, npad, nxh)), W_own.reshape((nv, npad, npad, nxh)), box,
                                  pad, r_max, tau2, tau2_fudge, min_weight, gridding, mask_outside)
        return out.reshape(lead + (box, box, box))
    F = xp.array(F_own, dtype=np.complex128).reshape((nv, n_own, npad, nxh))
    W = xp.array(W_own, dtype=np.float64).reshape((nv, n_own, npad, nxh))
    _merge_x0(comm, F, W, layout)
    _divide(comm, F, W, layout, box, pad, r_max, tau2, tau2_fudge, min_weight)
    del W
    t = layout.transpose(box, pad, r_max)
    rows = _transpose_to_rows(comm, F, t)                                  # (nv, Np_kz, n_y, ncol), F freed
    del F
    part = _row_ffts(rows, t, comm.rank, box, pad, gridding)               # (nv, box_z, n_y, box_x)
    out = _gather_map(comm, part, t, nv, box).reshape(lead + (box, box, box))
    if mask_outside:
        soft_mask_outside(out, inplace=True)
    return out if xp is np else xp.asarray(out)


def _serial_reconstruct(Fv, Wv, box, pad, r_max, tau2, tau2_fudge, min_weight, gridding, mask_outside):
    """The whole volume is on this rank: :func:`mpi_em.fourier.reconstruct` of each volume, on its device."""
    from .fourier import reconstruct

    xp = xp_of(Fv)
    out = xp.empty((Fv.shape[0], box, box, box), dtype=np.float64)
    for v in range(Fv.shape[0]):
        t2 = None if tau2 is None else xp.asarray(tau2[v] if tau2.ndim > 1 else tau2)
        out[v] = reconstruct(Fv[v].astype(np.complex128, copy=False), Wv[v].astype(np.float64, copy=False), box,
                             pad, r_max, t2, tau2_fudge, min_weight, gridding, mask_outside)
    return out


def _merge_x0(comm, F, W, layout: PlaneLayout) -> None:
    """Hermitian merge of the kx = 0 plane, in place: F(kz, ky, 0) += conj(F(-kz, -ky, 0)), W likewise."""
    xp = xp_of(F)
    npad = layout.npad
    x0 = np.stack([to_host(F[..., 0].real), to_host(F[..., 0].imag), to_host(W[..., 0])], axis=-1)
    full0 = _allgather_planes(comm, np.moveaxis(x0, 1, 0), layout)      # (Np_kz, nv, Np_ky, 3)
    mz = (-layout.planes[comm.rank]) % npad
    my = (-np.arange(npad)) % npad
    m0 = xp.asarray(np.moveaxis(full0[mz][:, :, my], 0, 1))                # (nv, n_own, Np, 3)
    F[..., 0] = F[..., 0] + xp.conj(m0[..., 0] + 1j * m0[..., 1])
    W[..., 0] = W[..., 0] + m0[..., 2]


def _divide(comm, F, W, layout: PlaneLayout, box, pad, r_max, tau2, tau2_fudge, min_weight) -> None:
    """Regularised division of the owned planes, in place in F (zero outside the ball); the mean of W in the
    ball by allreduce (same formulas as fourier.radius_3d / reconstruct)."""
    from mpi4py import MPI

    xp = xp_of(F)
    npad, nxh, nv = layout.npad, layout.nxh, F.shape[0]
    kz = xp.asarray(np.fft.fftfreq(npad, d=1.0 / npad)[layout.planes[comm.rank]]).reshape(-1, 1, 1)
    ky = xp.fft.fftfreq(npad, d=1.0 / npad).reshape(1, -1, 1)
    kx = xp.arange(nxh, dtype=xp.float64).reshape(1, 1, -1)
    r = xp.sqrt(kz * kz + ky * ky + kx * kx) / pad
    inside = reconstruction_ball(r, r_max, box)
    loc = np.array([float(W[v][inside].sum()) for v in range(nv)] + [float(inside.sum())])
    tot = np.empty_like(loc)
    comm.Allreduce(loc, tot, op=MPI.SUM)
    count = tot[-1]
    for v in range(nv):  # in place in F (a private complex128 copy): no third volume-sized array
        mean = tot[v] / count if count > 0 else None
        if tau2 is not None:  # the serial reconstruction's divisor (a zero-variance prior where tau2 = 0)
            denom = regularised_denominator(W[v], r, mean if mean is not None else 0.0,
                                            xp.asarray(tau2[v] if tau2.ndim > 1 else tau2), tau2_fudge)
        else:
            denom = xp.maximum(W[v], min_weight * (float(mean) if mean is not None else 1.0))
        F[v] /= denom
        F[v][~inside] = 0
        del denom


def _transpose_to_rows(comm, F, t: Transpose):
    """ifft along ky of the owned band planes, then one ``Alltoallv``: owned kz planes -> owned y rows with every
    kz. F (nv, n_own, Np, Nxh) divided planes -> (nv, Np_kz, n_y, ncol) complex128 on F's module."""
    from mpi4py import MPI

    xp = xp_of(F)
    rank, size, nv = comm.rank, comm.size, F.shape[0]
    npad = t.layout.npad
    G = F[:, xp.asarray(t.own_band[rank]), :, :t.ncol]
    G = xp.fft.ifft(G, axis=-2) if G.size else G                            # (nv, n_band, Np_y, ncol)
    send = _as_real_host(xp.moveaxis(G[:, :, xp.asarray(t.send_rows), :], 2, 0)).reshape(-1)
    del G
    scounts, rcounts = t.counts(rank, nv)
    recv = np.empty(sum(rcounts), dtype=np.float64)
    comm.Alltoallv([send, (scounts, _displs(scounts)), MPI.DOUBLE], [recv, (rcounts, _displs(rcounts)), MPI.DOUBLE])
    del send
    n_y = int(t.rows_to[rank].size)
    H = np.zeros((nv, npad, n_y, t.ncol), dtype=np.complex128)
    rd = _displs(rcounts)
    for s in range(size):
        nb = t.own_band[s].size
        if nb and n_y:
            blk = recv[rd[s]:rd[s] + rcounts[s]].view(np.complex128)
            H[:, t.band_planes[s]] = np.moveaxis(blk.reshape(n_y, nv, nb, t.ncol), 0, 2)
    return xp.asarray(H)


def _row_ffts(H, t: Transpose, rank, box, pad, gridding):
    """ifft along kz and irfft along kx of the owned y rows, cropped to the box (fftshift) and gridding-corrected:
    (nv, Np_kz, n_y, ncol) -> real (nv, box_z, n_y, box_x)."""
    xp = xp_of(H)
    nv, npad, n_y = H.shape[0], t.layout.npad, H.shape[2]
    if H.size:
        H = xp.fft.ifft(H, axis=1)
        R = xp.fft.irfft(H, n=npad, axis=-1)                               # (nv, Np_z, n_y, Np_x) real
    else:
        R = xp.zeros((nv, npad, n_y, npad), dtype=xp.float64)
    del H
    srcx = xp.asarray(t.src)
    part = R[:, srcx][..., srcx]
    del R
    if gridding:
        part /= gridding_factor(box, pad, xp)[:, xp.asarray(t.crop_rows[rank]), :]
    return part


def _gather_map(comm, part, t: Transpose, nv, box):
    """``Allgatherv`` of every rank's cropped y rows -> the (nv, box, box, box) float64 map on the host."""
    from mpi4py import MPI

    local = _as_real_host(xp_of(part).moveaxis(part, 2, 0))                # (n_b, nv, box, box)
    counts = [int(b.size) * nv * box * box for b in t.crop_rows]
    allv = np.empty(sum(counts), dtype=np.float64)
    comm.Allgatherv(local.reshape(-1), [allv, (counts, _displs(counts)), MPI.DOUBLE])
    out = np.empty((nv, box, box, box), dtype=np.float64)
    gd = _displs(counts)
    for s, rows in enumerate(t.crop_rows):
        if rows.size:
            out[:, :, rows, :] = np.moveaxis(allv[gd[s]:gd[s] + counts[s]].reshape(rows.size, nv, box, box), 0, 2)
    return out


# ------------------------------------------------------------------------------------------ memory
def volume_bytes_per_rank(box: int, pad: int, size: int, n_vol: int = 2, dtype=np.complex128) -> dict:
    """Bytes of accumulator (F + W) each rank holds in the all-reduce and in the stride design.

    ``dtype``: the complex dtype of F (W is its real counterpart). Returns ``allreduce`` (int, every rank:
    full F + W), ``stride`` (list per rank: owned planes of F + W), ``stride_max``, ``ratio``
    (allreduce / stride_max) and ``stride_reconstruct_transient_max``: an estimate of the extra transient
    bytes of :func:`distributed_reconstruct` per rank (complex128 copies of the owned planes, host transpose
    buffers and the y-row slab; excludes the box^3 output).
    """
    npad = pad * box
    nxh = npad // 2 + 1
    cdt = _complex_dtype(dtype)
    per_voxel = cdt.itemsize + _real_dtype(cdt).itemsize
    plane = npad * nxh
    full = n_vol * npad * plane * per_voxel
    owned = [int(c) for c in plane_layout(npad, size).counts]
    stride = [n_vol * n * plane * per_voxel for n in owned]
    n_max = max(owned) if owned else 0
    # distributed_reconstruct per owned voxel: the complex128 F / float64 W working copies and radius (divided
    # in place), then the ky-FFT, transpose send/receive buffers and the kz/kx FFTs of the y-row slab, which
    # hold at most two complex128 copies at a time: 48 bytes (tracemalloc: ~20-40 bytes measured at box 32,
    # P = 1..8, see tests/test_reconstruct_job.py::test_memory_budget_below_one_volume). Excludes the maps.
    transient = n_vol * plane * n_max * 48
    return {
        "npad": npad,
        "size": size,
        "allreduce": int(full),
        "stride": stride,
        "stride_max": int(max(stride) if stride else 0),
        "ratio": float(full / max(stride)) if stride and max(stride) else math.inf,
        "stride_reconstruct_transient_max": int(transient),
    }
