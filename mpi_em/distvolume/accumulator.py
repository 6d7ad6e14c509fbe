"""Streaming insertion into owned kz planes: :class:`PlaneOwnerAccumulator` (contributions routed per batch)."""
from __future__ import annotations

import numpy as np

from ..backend import scatter_add, to_host
from ..distributed import RankFailed
from ..fourier.projector import _trilinear_stencil
from .layout import plane_layout, _check_layout, _complex_dtype, _displs, _real_dtype


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
            from ..errors import MpiEmError

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
            from ..errors import MpiEmError

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
        from .reconstruct import distributed_reconstruct

        return distributed_reconstruct(self.comm, self.F, self.W, box, pad, r_max, **kw)
