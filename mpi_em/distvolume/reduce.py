"""Reduce-scatter of full local partial sums into the kz planes each rank owns (plain or compressed)."""
from __future__ import annotations

import numpy as np

from ..backend import xp_of
from ..codec import compress_for_send, decompress_received
from .layout import (PlaneLayout, plane_layout, _as_real_host, _ball_index, _check_layout, _displs, _real_dtype,
                     _wrapped)


# --------------------------------------------------------------------------------- reduce-scatter
def reduce_scatter_planes(comm, buf, compress: bool = False, r_max_padded=None, *, level: int = 1,
                          check: bool = True, stats: dict | None = None):
    """Sum ``buf`` (..., Np, Np, Np//2+1) over ranks; return the owned planes (..., n_owned, Np, Np//2+1).

    Collective. ``buf`` is this rank's full partial sum (NumPy or CuPy, real or complex; leading axes are
    volumes, e.g. the two half sets); the result has the same dtype and module.

    - ``compress=False``: per volume, a pairwise exchange of each owner's planes (:func:`_pairwise_sum`: the
      bytes of a ``Reduce_scatter``, staged through host copies of 1/P of one volume, summed on the buffer's
      module in a fixed order: on a GPU rank on the device). With
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

    ``stats`` (a dict, optional) receives ``bytes_sent`` (bytes this rank handed to other ranks: the other
    owners' planes, or their compressed chunks with compression) and
    ``bytes_raw`` (the local buffer's size).
    """
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
    # per volume, this rank's own planes summed with every other rank's copy of them (:func:`_pairwise_sum`);
    # host staging of 1/P of one volume each way
    out = xp.empty((nv, mine.size, npad, nxh), dtype=buf.dtype)
    sent = 0
    for v in range(nv):
        out[v], b = _pairwise_sum(comm, lambda d: flat[v][xp.asarray(plan[d])], (npad, nxh), layout)
        sent += b
    if stats is not None:
        stats["bytes_sent"] = int(sent)
    return out.reshape(lead + (mine.size, npad, nxh))


def _pairwise_sum(comm, part_of, tail, layout: PlaneLayout, planes=None):
    """Reduce-scatter of one volume by pairwise exchange: in step k = 1..P-1 this rank sends the part owner
    rank + k needs (``part_of(owner)``: an array on the buffer's module, ``planes[owner]`` (default the layout's)
    planes x ``tail``) and receives its own part from rank - k, added to its own copy on the buffer's module.
    -> (the summed own part, bytes sent). Every rank sends and receives 1/P of the volume per step, the links
    busy in parallel ((P-1)/P of the volume each way, as a ring reduce-scatter), and the sums are made where the
    buffer lives (on a GPU rank: on the device, not by MPI's reduction on the host). Summation order: own, then
    rank - 1, rank - 2, ... (deterministic; MPI's Reduce had its own)."""
    P, r = comm.size, comm.rank
    planes = layout.planes if planes is None else planes
    own = part_of(r)  # a new array (the parts are taken by fancy indexing): summed into in place
    xp = xp_of(own)
    real = _real_dtype(own.dtype) if np.iscomplexobj(own) else own.dtype
    shape = (planes[r].size,) + tuple(tail)
    sent = 0
    for k in range(1, P):
        dst, src = (r + k) % P, (r - k) % P
        send = _as_real_host(part_of(dst)) if planes[dst].size else np.empty(0, dtype=real)
        recv = np.empty(shape, dtype=own.dtype) if planes[r].size else np.empty(0, dtype=own.dtype)
        comm.Sendrecv(send, dest=dst, recvbuf=recv.view(real), source=src)
        sent += send.nbytes
        del send
        if recv.size:
            own += xp.asarray(recv)
    return own, sent


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
    cube_planes = [p[np.isin(p, near)] for p in plan]  # each owner's planes inside the cube
    loc = xp.asarray(layout.local(cube_planes[rank]))
    sent = 0
    for v in range(nv):
        part, b = _pairwise_sum(comm, lambda d: flat[v][xp.asarray(cube_planes[d])][:, rows, :R + 1],
                                (near.size, R + 1), layout, cube_planes)
        sent += b
        if cube_planes[rank].size:
            out[v][loc[:, None, None], rows[None, :, None], xp.arange(R + 1)[None, None, :]] = part
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
