#!/usr/bin/env python
"""Time the distributed reconstruction (division + distributed inverse FFT of two half volumes) under mpirun.

    mpirun -n 2 python benchmarks/distfft.py --box 96 --r-max 47 12 [--json OUT.json]

Random owned planes, zero outside the ball of each current size r_max (as the accumulators of an iteration at
that size are); prints seconds per call (mean of --repeats) and a checksum of the maps (equal between versions).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mpi_em.distvolume import distributed_reconstruct, owned_planes  # noqa: E402
from mpi_em.fourier import radius_3d  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--box", type=int, default=96)
    ap.add_argument("--pad", type=int, default=2)
    ap.add_argument("--r-max", type=int, nargs="+", default=None, help="current sizes in pixels (default box/2-1)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    comm = MPI.COMM_WORLD
    box, pad = a.box, a.pad
    npad = pad * box
    rows = []
    for r_max in a.r_max or [box // 2 - 1]:
        rng = np.random.default_rng(comm.rank)
        mine = owned_planes(npad, comm.rank, comm.size)
        shape = (2, mine.size, npad, npad // 2 + 1)
        F = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
        W = rng.uniform(0.5, 1.0, shape)
        outside = radius_3d(npad)[mine] / pad > r_max + 0.5
        F[:, outside] = 0
        W[:, outside] = 0
        comm.Barrier()
        t = time.perf_counter()
        for _ in range(a.repeats):
            out = distributed_reconstruct(comm, F, W, box, pad, r_max)
        comm.Barrier()
        t = (time.perf_counter() - t) / a.repeats
        rows.append({"box": box, "pad": pad, "r_max": r_max, "ranks": comm.size, "seconds": t,
                     "checksum": float(np.abs(out).sum())})
        if comm.rank == 0:
            print(f"box {box}, r_max {r_max}, {comm.size} ranks: {t:.3f} s per two-volume reconstruction "
                  f"(checksum {rows[-1]['checksum']:.6e})")
    if comm.rank == 0 and a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
