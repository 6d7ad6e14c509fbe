"""Distributed reconstruction from owned planes (merge -> divide -> transpose -> FFTs -> gather), and the
bytes per rank of the designs."""
from __future__ import annotations

import math

import numpy as np

from ..backend import to_host, xp_of
from ..fourier import default_r_max, gridding_factor, reconstruction_ball, regularised_denominator, soft_mask_outside
from .layout import (PlaneLayout, Transpose, plane_layout, _as_real_host, _complex_dtype, _displs,
                     _real_dtype)


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
    per volume. One volume at a time (the working copies of one volume only), in the inputs' precision:
    complex128 / float64 -> float64 maps; complex64 / float32 (single-precision accumulators) -> float32 maps,
    equal to float32 rounding (copies, transpose messages and FFTs in single precision). On the module of
    ``F_own``. Inputs are not modified.

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
    side = F_own.shape[-3]
    cube = comm.size == 1 and serial_shortcut and side <= npad and tuple(F_own.shape[-2:]) == (side, side // 2 + 1)
    if (not cube and tuple(F_own.shape[-3:]) != (n_own, npad, nxh)) or tuple(W_own.shape) != tuple(F_own.shape):
        raise ValueError(f"rank {comm.rank}: owned arrays must be (..., {n_own}, {npad}, {nxh}); got F "
                         f"{tuple(F_own.shape)}, W {tuple(W_own.shape)}")
    nv = int(np.prod(lead, dtype=np.int64))
    if tau2 is not None:
        tau2 = np.asarray(to_host(tau2), dtype=np.float64)
        tau2 = tau2.reshape(-1, tau2.shape[-1]) if tau2.ndim > 1 else tau2
    if comm.size == 1 and serial_shortcut:  # the pad x box layout, or the cube an E-step accumulated into
        out = _serial_reconstruct(F_own.reshape((nv, side, side, side // 2 + 1)),
                                  W_own.reshape((nv, side, side, side // 2 + 1)), box,
                                  pad, r_max, tau2, tau2_fudge, min_weight, gridding, mask_outside)
        return out.reshape(lead + (box, box, box))
    t = layout.transpose(box, pad, r_max)
    F_all, W_all = F_own.reshape((nv, n_own, npad, nxh)), W_own.reshape((nv, n_own, npad, nxh))
    cdt = np.complex64 if F_own.dtype == np.complex64 else np.complex128   # single-precision accumulators stay
    rdt = _real_dtype(cdt)                                                 # single (copies, transpose, FFTs)
    out = xp.empty((nv, box, box, box), dtype=rdt)  # on the ranks' device, as returned
    for v in range(nv):  # one volume at a time (every rank the same loop): one volume's working copies at most
        F = xp.array(F_all[v:v + 1], dtype=cdt)
        W = xp.array(W_all[v:v + 1], dtype=rdt)
        _merge_x0(comm, F, W, layout)
        _divide(comm, F, W, layout, box, pad, r_max,
                None if tau2 is None else (tau2[v] if tau2.ndim > 1 else tau2), tau2_fudge, min_weight)
        del W
        rows = _transpose_to_rows(comm, F, t)                              # (1, Np_kz, n_y, ncol), F freed
        del F
        part = _row_ffts(rows, t, comm.rank, box, pad, gridding)           # (1, box_z, n_y, box_x)
        del rows
        _gather_map(comm, part, t, 1, box, out=out[v:v + 1])
        del part
    out = out.reshape(lead + (box, box, box))
    if mask_outside:  # on the maps' device (on the host it took ~15-30 s per map at box 1024)
        soft_mask_outside(out, inplace=True)
    return out


def _serial_reconstruct(Fv, Wv, box, pad, r_max, tau2, tau2_fudge, min_weight, gridding, mask_outside):
    """The whole volume is on this rank: :func:`mpi_em.fourier.reconstruct` of each volume, on its device."""
    from ..fourier import reconstruct
    from ..fourier.projector import to_full_layout

    xp = xp_of(Fv)
    out = xp.empty((Fv.shape[0], box, box, box), dtype=np.float32 if Fv.dtype == np.complex64 else np.float64)
    for v in range(Fv.shape[0]):
        t2 = None if tau2 is None else xp.asarray(tau2[v] if tau2.ndim > 1 else tau2)
        # a cube of the E-step's reach (em.model.CroppedAccumulators) is put into the pad x box layout one volume
        # at a time; its working copy in the arrays' precision (complex64 stays single)
        out[v] = reconstruct(to_full_layout(Fv[v], pad * box), to_full_layout(Wv[v], pad * box), box, pad, r_max,
                             t2, tau2_fudge, min_weight, gridding, mask_outside)
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
    kz. F (nv, n_own, Np, Nxh) divided planes -> (nv, Np_kz, n_y, ncol) of F's dtype on F's module."""
    from mpi4py import MPI

    xp = xp_of(F)
    rank, size, nv = comm.rank, comm.size, F.shape[0]
    npad = t.layout.npad
    G = F[:, xp.asarray(t.own_band[rank]), :, :t.ncol]
    G = xp.fft.ifft(G, axis=-2) if G.size else G                            # (nv, n_band, Np_y, ncol)
    cdt = np.dtype(F.dtype)
    rdt, mpi_real = _real_dtype(cdt), (MPI.FLOAT if cdt == np.complex64 else MPI.DOUBLE)
    send = _as_real_host(xp.moveaxis(G[:, :, xp.asarray(t.send_rows), :], 2, 0)).astype(rdt, copy=False).reshape(-1)
    del G
    scounts, rcounts = t.counts(rank, nv)
    recv = np.empty(sum(rcounts), dtype=rdt)
    comm.Alltoallv([send, (scounts, _displs(scounts)), mpi_real], [recv, (rcounts, _displs(rcounts)), mpi_real])
    del send
    n_y = int(t.rows_to[rank].size)
    # assembled on F's device (GPU ranks: each rank's block sent as it came, the strided copies there; on the host
    # they took ~19 s per map at box 1024)
    H = xp.zeros((nv, npad, n_y, t.ncol), dtype=cdt)
    rd = _displs(rcounts)
    for s in range(size):
        nb = t.own_band[s].size
        if nb and n_y:
            blk = xp.asarray(recv[rd[s]:rd[s] + rcounts[s]]).view(cdt)
            H[:, xp.asarray(t.band_planes[s])] = xp.moveaxis(blk.reshape(n_y, nv, nb, t.ncol), 0, 2)
    del recv
    return H


def _row_ffts(H, t: Transpose, rank, box, pad, gridding):
    """ifft along kz and irfft along kx of the owned y rows, cropped to the box (fftshift) and gridding-corrected:
    (nv, Np_kz, n_y, ncol) -> real (nv, box_z, n_y, box_x)."""
    xp = xp_of(H)
    nv, npad, n_y = H.shape[0], t.layout.npad, H.shape[2]
    if H.size:
        H = xp.fft.ifft(H, axis=1)
        R = xp.fft.irfft(H, n=npad, axis=-1)                               # (nv, Np_z, n_y, Np_x) real
    else:
        R = xp.zeros((nv, npad, n_y, npad), dtype=_real_dtype(H.dtype))
    del H
    srcx = xp.asarray(t.src)
    part = R[:, srcx][..., srcx]
    del R
    if gridding:  # the factor of this rank's rows only
        part /= gridding_factor(box, pad, xp, xp.asarray(t.crop_rows[rank]))
    return part


def _gather_map(comm, part, t: Transpose, nv, box, out=None):
    """``Allgatherv`` of every rank's cropped y rows -> the (nv, box, box, box) map on the rows' module (float32
    rows stay float32, others float64), written into ``out`` where given (the caller's stack of maps)."""
    from mpi4py import MPI

    local = _as_real_host(xp_of(part).moveaxis(part, 2, 0))                # (n_b, nv, box, box)
    rdt = np.dtype(np.float32 if local.dtype == np.float32 else np.float64)
    local = local.astype(rdt, copy=False)
    counts = [int(b.size) * nv * box * box for b in t.crop_rows]
    allv = np.empty(sum(counts), dtype=rdt)
    comm.Allgatherv(local.reshape(-1), [allv, (counts, _displs(counts)), MPI.FLOAT if rdt == np.float32 else MPI.DOUBLE])
    xp = xp_of(part)
    if out is None:  # assembled on the rows' device (strided copies there)
        out = xp.empty((nv, box, box, box), dtype=rdt)
    gd = _displs(counts)
    for s, rows in enumerate(t.crop_rows):
        if rows.size:
            blk = xp.asarray(allv[gd[s]:gd[s] + counts[s]]).reshape(rows.size, nv, box, box)
            out[:, :, xp.asarray(rows), :] = xp.moveaxis(blk, 0, 2)
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
