#!/usr/bin/env python
"""Seconds of the M-step's reduce-scatter of full local accumulators into owned kz planes, per rank count:
mpi_em's plain path (:func:`mpi_em.distvolume.reduce_scatter_planes`: a pairwise exchange, the sums made where
the buffer lives), its compressed path, and MPI's own reduction (one ``Reduce`` per volume and owner on host
copies, the plain path's former implementation, kept here as the baseline). Each rank holds V random complex64
volumes (Np, Np, Np//2+1) on its device; the results of the three are checked equal to float32 rounding.

    mpirun -n 2 python benchmarks/reduce_scatter.py --np 256 384 --device cpu --json out.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mpi4py import MPI  # noqa: E402

from mpi_em.backend import get_xp, to_host, xp_of  # noqa: E402
from mpi_em.distvolume import owned_planes, reduce_scatter_planes  # noqa: E402


def mpi_reduce_baseline(comm, buf):
    """One ``Reduce`` per (volume, owner) of that owner's planes, through host copies (MPI sums on the host)."""
    xp = xp_of(buf)
    npad = buf.shape[-3]
    plan = [owned_planes(npad, d, comm.size) for d in range(comm.size)]
    out = np.empty((buf.shape[0], plan[comm.rank].size) + buf.shape[-2:], dtype=buf.dtype)
    for v in range(buf.shape[0]):
        for d in range(comm.size):
            chunk = np.ascontiguousarray(to_host(buf[v][xp.asarray(plan[d])])).view(np.float32)
            recv = out[v].view(np.float32) if d == comm.rank else None
            comm.Reduce(chunk, recv, op=MPI.SUM, root=d)
    return xp.asarray(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--np", type=int, nargs="+", default=[256], help="padded sides to measure")
    p.add_argument("--volumes", type=int, default=2, help="volumes per rank (default 2: the half sets)")
    p.add_argument("--device", default="cpu", help="cpu or gpu (each rank on its node-local GPU)")
    p.add_argument("--repeat", type=int, default=2, help="repeats of each; the fastest is reported")
    p.add_argument("--json", help="write the rows here (rank 0)")
    a = p.parse_args()
    comm = MPI.COMM_WORLD
    dev = a.device
    if dev == "gpu":
        from mpi_em.distributed import select_device

        dev = select_device(comm, "gpu")
    xp = get_xp(dev)
    rows = []
    for npad in a.np:
        rng = np.random.default_rng(comm.rank)
        shape = (a.volumes, npad, npad, npad // 2 + 1)
        host = (rng.standard_normal(shape, dtype=np.float32) + 1j * rng.standard_normal(shape, dtype=np.float32))
        buf = xp.asarray(host.astype(np.complex64))
        del host
        got = {}
        for name, fn in (("pairwise", lambda: reduce_scatter_planes(comm, buf, check=False)),
                         ("mpi_reduce", lambda: mpi_reduce_baseline(comm, buf)),
                         ("compressed", lambda: reduce_scatter_planes(comm, buf, compress=True, check=False))):
            best = None
            for _ in range(a.repeat):
                comm.Barrier()
                t = time.perf_counter()
                out = fn()
                if xp is not np:
                    xp.cuda.Stream.null.synchronize()
                comm.Barrier()
                dt = comm.allreduce(time.perf_counter() - t, op=MPI.MAX)
                best = dt if best is None else min(best, dt)
            got[name] = to_host(out)
            rows.append({"np": npad, "volumes": a.volumes, "ranks": comm.size, "device": a.device, "method": name,
                         "seconds": round(best, 4), "gb_per_rank": round(buf.nbytes / 1e9, 3)})
        scale = max(1.0, float(np.abs(got["mpi_reduce"]).max()))
        err = max(float(np.abs(got[m] - got["mpi_reduce"]).max()) for m in ("pairwise", "compressed")) / scale
        ok = comm.allreduce(err, op=MPI.MAX) < 1e-5
        for r in rows[-3:]:
            r["equal_to_float32_rounding"] = bool(ok)
        del buf
    if comm.rank == 0:
        print(f"{'Np':>5} {'ranks':>5} {'GB/rank':>8} {'method':>11} {'s':>8} {'vs MPI Reduce':>14}")
        for r in rows:
            base = next(x["seconds"] for x in rows if x["np"] == r["np"] and x["method"] == "mpi_reduce")
            print(f"{r['np']:>5} {r['ranks']:>5} {r['gb_per_rank']:>8} {r['method']:>11} {r['seconds']:>8.3f} "
                  f"{base / r['seconds']:>13.2f}x")
        if a.json:
            rec = {"date": datetime.date.today().isoformat(), "host": platform.node(), "cpu": platform.processor(),
                   "mpi": MPI.Get_library_version().splitlines()[0], "command": " ".join(sys.argv), "rows": rows}
            Path(a.json).write_text(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
