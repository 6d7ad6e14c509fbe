#!/usr/bin/env python
"""Bytes per reduction and memory per rank of the volume buffers: all-reduce vs stride ownership vs compression.

Run under MPI (every rank takes part)::

    mpirun -n 2 python benchmarks/volume_memory.py --box 64 96 --n 1000 --json volume_P2.json

Each rank inserts its share of ``--n`` simulated particles (phantom, CTF, noise, random poses) into two
half-set accumulators (complex128 F, float64 W; FFT layout, pad 2) at r_max = box/8, box/4 and box/2 - 1
(early low-resolution iterations ... full resolution), then sums them over the ranks three ways:

- ``allreduce``: the classic design, ``Allreduce`` of the full accumulators; every rank ends with all of them.
- ``stride``: :func:`mpi_em.distvolume.reduce_scatter_planes` (one ``Reduce_scatter``); rank r ends with the kz
  planes z = r (mod P) only.
- ``stream``: :class:`mpi_em.distvolume.PlaneOwnerAccumulator` (what ``--max-volume-memory`` uses): every batch of
  ``--stream-batch`` images sends its stencil contributions to the owners of their planes; no full volume anywhere.
- ``stride+codec``: the same as ``stride`` with each owner's chunk half-ball packed, byte-shuffled and zstd-compressed
  (:mod:`mpi_em.codec`), and the owned planes held compressed afterwards (:class:`mpi_em.codec.CompressedBuffer`).

Reported per rank (max over ranks): bytes sent by the rank in the reduction (all-reduce / reduce-scatter: the full
local buffer is the message; codec: the compressed chunks actually sent), bytes of volume buffers held after the
reduction, the traced peak (tracemalloc, NumPy allocations) during the reduction, seconds, and the compressed /
decompressed throughput of the codec on the owned planes. All three sums are checked against each other.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mpi4py import MPI  # noqa: E402

from mpi_em import codec  # noqa: E402
from mpi_em.distvolume import PlaneOwnerAccumulator, _ball_index, owned_planes, reduce_scatter_planes  # noqa: E402
from mpi_em.fourier import SliceGeometry, padded_reach  # noqa: E402
from mpi_em.reconstruction import Accumulators, insert  # noqa: E402
from mpi_em.simulate import phantom, simulate_particles  # noqa: E402


N_VOL = 2  # accumulator volumes: 2 half sets (refine3d, reconstruct) or K classes (class3d); --volumes


def _traced(fn):
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    t = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return out, dt, peak


def prepared_batches(box: int, r_max: float, n_local: int, seed: int, batch: int = 64):
    """This rank's simulated particles as insertion-ready batches (half index, A, CTF.X, CTF^2)."""
    from mpi_em.ctf import ctf_images
    from mpi_em.geometry import euler_to_matrix
    from mpi_em.reconstruction import prepare_images

    vol = phantom(box, seed=1)
    sim = simulate_particles(vol, n_local, pixel_size=2.0, snr=0.1, seed=seed)
    geom = SliceGeometry(box, r_max=r_max, pad=2)
    out = []
    for s in range(0, n_local, batch):
        sl = slice(s, min(n_local, s + batch))
        A = euler_to_matrix(sim.rot[sl], sim.tilt[sl], sim.psi[sl])
        ctf = ctf_images(box, 2.0, sim.defocus_u[sl], sim.defocus_v[sl], sim.defocus_angle[sl], 300.0, 2.7, 0.1,
                         0.0, 0.0)
        data, weights = prepare_images(sim.images[sl], ctf, np.stack([sim.shift_x[sl], sim.shift_y[sl]], 1), geom)
        out.append((np.arange(sl.start, sl.stop) % N_VOL, A, data, weights))
    return geom, out


def dense_insert(geom, batches):
    acc = Accumulators(geom, n_vol=N_VOL)
    for half, A, data, weights in batches:
        insert(acc, half, A, data, weights)
    return acc.F, acc.W


def one_case(comm, box: int, r_max: float, n: int, level: int, stream_batch: int = 8) -> dict:
    P, rank = comm.size, comm.rank
    n_local = n // P + (1 if rank < n % P else 0)
    geom, batches = prepared_batches(box, r_max, n_local, seed=100 + rank)
    npad, nxh = 2 * box, box + 1
    full_bytes = N_VOL * npad * npad * nxh * (16 + 8)
    rp = padded_reach(r_max, 2)
    planes = owned_planes(npad, rank, P)
    ball = _ball_index(planes, npad, nxh, rp)

    def hold_compressed(Fo, Wo):
        return [codec.CompressedBuffer.from_array(np.ascontiguousarray(a.reshape(N_VOL, -1)[:, ball]), None,
                                                  level=level) for a in (Fo, Wo)]

    # A: the all-reduce design: full local sums, Allreduce, every rank keeps everything
    def allreduce():
        F, W = dense_insert(geom, batches)
        comm.Allreduce(MPI.IN_PLACE, F, op=MPI.SUM)
        comm.Allreduce(MPI.IN_PLACE, W, op=MPI.SUM)
        return F, W

    comm.Barrier()
    (Fa, Wa), t_all, peak_all = _traced(allreduce)

    # B: stride ownership, full local sums reduced to the owners
    def stride():
        F, W = dense_insert(geom, batches)
        Fo, Wo = reduce_scatter_planes(comm, F), reduce_scatter_planes(comm, W)
        del F, W
        return Fo, Wo

    comm.Barrier()
    (Fs, Ws), t_rs, peak_rs = _traced(stride)

    # C: as B with compressed messages, owned planes then held compressed
    sF, sW = {}, {}

    def codec_stride():
        F, W = dense_insert(geom, batches)
        Fo = reduce_scatter_planes(comm, F, compress=True, r_max_padded=rp, level=level, stats=sF)
        Wo = reduce_scatter_planes(comm, W, compress=True, r_max_padded=rp, level=level, stats=sW)
        del F, W
        held = hold_compressed(Fo, Wo)
        return Fo, Wo, held

    comm.Barrier()
    (Fc, Wc, held), t_c, peak_c = _traced(codec_stride)

    # D: streaming to the plane owners (what --max-volume-memory uses): no rank ever holds a full volume
    def stream():
        acc = PlaneOwnerAccumulator(comm, geom.vol_shape, n_vol=N_VOL)
        small = [tuple(x[s:s + stream_batch] for x in b) for b in batches for s in range(0, len(b[0]), stream_batch)]
        n_all = comm.allreduce(len(small), op=MPI.MAX)
        for i in range(n_all):
            if i < len(small):
                acc.backproject(*small[i], geom)
            else:
                acc.add_empty()
        acc.free()
        return acc

    comm.Barrier()
    sacc, t_st, peak_st = _traced(stream)

    scale_F, scale_W = np.abs(Fa).max(), np.abs(Wa).max()
    ok = bool(np.allclose(Fs, Fa[:, planes], rtol=1e-10, atol=1e-10 * scale_F) and
              np.allclose(Ws, Wa[:, planes], rtol=1e-10, atol=1e-10 * scale_W) and
              np.allclose(Fc, Fs, rtol=1e-10, atol=1e-10 * scale_F) and
              np.allclose(sacc.F, Fs, rtol=1e-10, atol=1e-10 * scale_F) and
              np.allclose(sacc.W, Ws, rtol=1e-10, atol=1e-10 * scale_W))
    t = time.perf_counter()
    back = [h.to_array() for h in held]
    t_dec = time.perf_counter() - t
    exact = all(np.array_equal(b, np.ascontiguousarray(a.reshape(N_VOL, -1)[:, ball])) for a, b in zip((Fc, Wc), back))
    t = time.perf_counter()
    hold_compressed(Fc, Wc)
    t_comp = time.perf_counter() - t
    own_bytes = Fs.nbytes + Ws.nbytes
    row = {
        "box": box, "r_max": r_max, "P": P, "n_particles": n, "volumes": N_VOL,
        "full_bytes": full_bytes,
        "allreduce_sent": full_bytes, "allreduce_held": full_bytes, "allreduce_peak": peak_all, "allreduce_s": t_all,
        "stride_sent": full_bytes, "stride_held": own_bytes, "stride_peak": peak_rs, "stride_s": t_rs,
        "codec_sent": sF["bytes_sent"] + sW["bytes_sent"], "codec_held": sum(h.nbytes for h in held),
        "codec_peak": peak_c, "codec_s": t_c,
        "stream_sent": sacc.n_sent * sacc._rec.itemsize, "stream_held": sacc.nbytes, "stream_peak": peak_st,
        "stream_s": t_st, "stream_batch": stream_batch,
        "held_compress_MBps": own_bytes / 1e6 / max(t_comp, 1e-9),
        "held_decompress_MBps": own_bytes / 1e6 / max(t_dec, 1e-9),
        "sums_agree": ok, "held_roundtrip_exact": exact,
    }
    rows = comm.gather(row, root=0)
    if rank:
        return None
    out = dict(row)
    for k in row:
        if k.endswith(("_sent", "_held", "_peak", "_s")):
            out[k] = max(r[k] for r in rows)
    out["sums_agree"] = all(r["sums_agree"] for r in rows)
    out["held_roundtrip_exact"] = all(r["held_roundtrip_exact"] for r in rows)
    out["per_rank"] = rows
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--box", type=int, nargs="+", default=[64, 96])
    ap.add_argument("--n", type=int, default=1000, help="particles in total (split over ranks)")
    ap.add_argument("--level", type=int, default=1, help="zstd level (default 1, as in the reduce-scatter)")
    ap.add_argument("--volumes", type=int, default=2, help="accumulator volumes (2 half sets, or K classes)")
    ap.add_argument("--r-max", type=float, nargs="+", default=None,
                    help="radii to measure, as fractions of box/2 - 1 (default 0.25 0.5 1)")
    ap.add_argument("--stream-batch", type=int, default=8, help="images per routed round in the stream design")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    global N_VOL
    N_VOL = args.volumes
    comm = MPI.COMM_WORLD
    rows = []
    t0 = time.time()
    for box in args.box:
        fr = args.r_max or [0.25, 0.5, 1.0]
        for r_max in sorted({round(f * (box // 2 - 1)) for f in fr}):
            r = one_case(comm, box, float(r_max), args.n, args.level, args.stream_batch)
            if comm.rank == 0:
                rows.append(r)
    if comm.rank:
        return 0
    mb = 1e6
    designs = ("allreduce", "stride", "codec", "stream")
    hdr = (f"{'box':>4} {'r_max':>5} {'P':>2} | " + " ".join(f"{'sent ' + d:>13}" for d in designs) + " | " +
           " ".join(f"{'held ' + d:>14}" for d in designs) + " | " +
           " ".join(f"{'peak ' + d:>14}" for d in designs) + " | " + " ".join(f"{'s ' + d:>11}" for d in designs)
           + " | ok")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['box']:>4} {r['r_max']:>5g} {r['P']:>2} | " +
              " ".join(f"{r[d + '_sent'] / mb:>13.1f}" for d in designs) + " | " +
              " ".join(f"{r[d + '_held'] / mb:>14.2f}" for d in designs) + " | " +
              " ".join(f"{r[d + '_peak'] / mb:>14.1f}" for d in designs) + " | " +
              " ".join(f"{r[d + '_s']:>11.2f}" for d in designs) + f" | {r['sums_agree'] and r['held_roundtrip_exact']}")
    print(f"({time.time() - t0:.1f} s; MB = 1e6 bytes, max over ranks. sent: bytes a rank hands to the collectives; "
          "held: volume buffers a rank keeps after the sum (codec: compressed); peak: traced NumPy peak of insertion + "
          "sum; s: seconds of insertion + sum)")
    for r in rows:
        print(f"box {r['box']} r_max {r['r_max']:g}: held vs all-reduce: stride {100 * (1 - r['stride_held'] / r['allreduce_held']):.0f}% "
              f"less, stride+codec {100 * (1 - r['codec_held'] / r['allreduce_held']):.0f}% less; peak: stream "
              f"{100 * (1 - r['stream_peak'] / r['allreduce_peak']):.0f}% less; sent: codec "
              f"{100 * (1 - r['codec_sent'] / r['allreduce_sent']):.0f}% less")
    if args.json:
        out = {"command": "mpirun -n %d python %s" % (comm.size, " ".join(sys.argv)),
               "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                           "python": platform.python_version(), "numpy": np.__version__,
                           "mpi": MPI.Get_library_version().splitlines()[0]},
               "elapsed_s": time.time() - t0, "results": rows}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2, default=float))
        print(f"wrote {args.json}")
    return 0 if all(r["sums_agree"] and r["held_roundtrip_exact"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
