#!/usr/bin/env python
"""Where the E-step's time goes: one refine3d E-step (coarse global pass, fine pass, insertion, statistics) over
simulated particles, every phase and the steps inside the coarse pass timed, the cross-term GEMM flops against
the same run's SGEMM ceiling (square 8192^3) and against a bare GEMM of the coarse pass's own shape. Image
preparation (FFT, CTF at the in-ball points) as in the jobs; the E-step results of 2026-11-23 prepared CTFs on the full rfft grid.

    python benchmarks/estep.py --device gpu --box 128 --n 8192 --batch 1024 --order 3 --r 29 --json OUT.json

The first batch of a pass is a warm-up (CuPy compiles kernels, the shared grid is projected): it is run once
untimed, then all batches are timed. Image preparation (FFT, re-centring, CTF) is timed as in the jobs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mpi_em.backend import get_xp, synchronize  # noqa: E402
from mpi_em.ctf import ctf_points  # noqa: E402
from mpi_em.em.engine import SearchSpec, Stats, expectation_batch, inverse_sigma2_points, shell_of_points  # noqa: E402
from mpi_em.em.references import References, fine_offsets, global_grid  # noqa: E402
from mpi_em.fourier import SliceGeometry  # noqa: E402
from mpi_em.geometry import euler_to_matrix  # noqa: E402
from mpi_em.reconstruction import centred_points  # noqa: E402
from mpi_em.sampling import angular_step  # noqa: E402
from mpi_em.simulate import phantom, simulate_particles  # noqa: E402
from mpi_em.timing import PhaseTimer  # noqa: E402


def gemm_rate(xp, M, N, K, repeats=3):
    a = xp.random.random((M, K)).astype(np.float32)
    b = xp.random.random((N, K)).astype(np.float32)
    c = a @ b.T
    synchronize(xp)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        c = a @ b.T
        synchronize(xp)
        best = min(best, time.perf_counter() - t)
    del c
    return 2.0 * M * N * K / best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--apix", type=float, default=1.5)
    ap.add_argument("--n", type=int, default=512, help="particles")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--order", type=int, default=2, help="HEALPix order of the global grid")
    ap.add_argument("--r", type=float, default=None, help="current size in pixels (default box/4)")
    ap.add_argument("--offset-range", type=float, default=5.0)
    ap.add_argument("--ceiling-n", type=int, default=8192, help="square SGEMM size for the ceiling (0: skip)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    xp = get_xp(a.device)
    box, apix = a.box, a.apix
    r = a.r if a.r else box / 4
    truth = phantom(box, seed=11).astype(np.float32)
    sim = simulate_particles(truth, a.n, pixel_size=apix, snr=0.05, seed=3, max_shift=2.0)
    geom = SliceGeometry(box, r_max=r, xp=xp)
    shells = shell_of_points(geom)
    n_shells = box // 2 + 1
    sigma2 = np.ones(n_shells)
    inv_s2 = inverse_sigma2_points(sigma2, shells, xp)
    maps = xp.asarray(np.stack([truth, truth]))
    refs = References(maps, 3, 2)
    step = angular_step(a.order)
    glob = global_grid(3, a.order, "C1", xp)
    half = np.arange(a.n) % 2

    def spec():
        return SearchSpec(dim=3, n_classes=1, global_mats=glob, local_mats=None, fine_mats=fine_offsets(3, step, xp),
                          offset_range=a.offset_range, offset_step=1.0, offset_sigma=2.0,
                          log_class_prior=xp.zeros(1, dtype=xp.float32))

    A_prev = euler_to_matrix(sim.rot, sim.tilt, sim.psi, xp=xp)

    def run(timer, sp, lo, hi):
        F = xp.zeros((2,) + geom.vol_shape, dtype=xp.complex128)
        W = xp.zeros((2,) + geom.vol_shape, dtype=xp.float64)
        stats = Stats.zeros(n_shells, 1)
        for s in range(lo, hi, a.batch):
            e = min(hi, s + a.batch)
            with timer("prepare"):
                c = ctf_points(geom, apix, sim.defocus_u[s:e], sim.defocus_v[s:e], sim.defocus_angle[s:e], 300.0,
                               2.7, 0.1)
                X, ctf = centred_points(xp.asarray(sim.images[s:e]), None, geom, c)
            expectation_batch(X, ctf, inv_s2, shells, refs, xp.asarray(half[s:e]), A_prev[s:e],
                              xp.zeros(e - s, dtype=xp.int64), sp, geom, F, W, stats, n_shells, timer=timer)
        synchronize(xp)

    sp = spec()
    run(PhaseTimer(xp), sp, 0, min(a.n, 2 * a.batch))  # warm-up: compilation, projections of the grid (cached)
    timer = PhaseTimer(xp, detail=True)
    t0 = time.perf_counter()
    run(timer, sp, 0, a.n)
    total = time.perf_counter() - t0
    d = timer.as_dict()
    flops = sum(d["flops"].values())
    out = {"device": a.device, "box": box, "n": a.n, "batch": a.batch, "order": a.order, "r": r,
           "in_ball_points": geom.m, "grid_orientations": int(glob.shape[0]), "seconds_total": total,
           "phases": d["seconds"], "detail": d.get("detail_seconds", {}), "flops": d["flops"],
           "estep_TFLOPs": flops / total / 1e12,
           "coarse_TFLOPs": d["flops"].get("coarse", 0) / max(d["seconds"].get("coarse", 1e-9), 1e-9) / 1e12}
    if a.device == "gpu":
        import cupy as cp

        out["gpu"] = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
        from mpi_em.sampling import translation_grid
        T = translation_grid(a.offset_range, 2.0).shape[0]
        out["coarse_gemm_shape"] = [a.batch // 2 * T, int(glob.shape[0]), 2 * geom.m]
        out["same_shape_sgemm_TFLOPs"] = gemm_rate(xp, a.batch // 2 * T, int(glob.shape[0]), 2 * geom.m) / 1e12
        if a.ceiling_n:
            out["sgemm_ceiling_TFLOPs"] = gemm_rate(xp, a.ceiling_n, a.ceiling_n, a.ceiling_n) / 1e12
    print(f"E-step of {a.n} particles, box {box}, order {a.order} ({glob.shape[0]} orientations), r {r:g} px, "
          f"batch {a.batch}, {a.device}: {total:.3f} s")
    print(f"{'phase':<22}{'seconds':>10}{'share':>8}")
    for k, v in sorted(d["seconds"].items(), key=lambda kv: -kv[1]):
        print(f"{k:<22}{v:10.3f}{100 * v / total:7.1f}%")
    for k, v in sorted(d.get("detail_seconds", {}).items()):
        print(f"  {k:<20}{v:10.3f}{100 * v / total:7.1f}%")
    print(f"GEMM flops {flops / 1e12:.2f} T: E-step {out['estep_TFLOPs']:.2f} TFLOP/s, coarse phase "
          f"{out['coarse_TFLOPs']:.2f} TFLOP/s")
    for k in ("same_shape_sgemm_TFLOPs", "sgemm_ceiling_TFLOPs"):
        if k in out:
            print(f"{k}: {out[k]:.1f}  (E-step at {100 * out['estep_TFLOPs'] / out[k]:.0f}%, coarse at "
                  f"{100 * out['coarse_TFLOPs'] / out[k]:.0f}%)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
