"""Evaluate refinements (refine3d) on simulated data: resolutions, pose errors, seconds and GEMM rates per iteration.

usage: python benchmarks/refine3d_eval.py DATA_DIR [--known DIR] [--particles STAR] [--ceiling 55] [--compare] [--per-iteration]
                                          NAME=RUN_DIR ...

DATA_DIR is a `mpi-em simulate` output (truth.mrc, particles.star); each RUN_DIR a refine3d output (`--o`);
--known a `mpi-em reconstruct` of the true poses (its gold-standard resolution is the reference figure).
For every run: iterations, the iteration whose files are the final ones, computation and wall clock (iterations
2-11 too), gold-standard resolution (FSC 0.143 of the half maps), map vs truth (FSC 0.5), median angular and shift
errors; the E-step's phases and GEMM FLOP rate against --ceiling (TFLOP/s) per iteration and per kind of search
(global: coarse GEMMs of more than 1 Tflop; local), the steps of MPI_EM_TIMING_DETAIL=1 runs, the reduce-scatter
and distributed reconstruction of multi-rank runs. --compare: the fraction of particles with the same pose in the
first run and each other run (1e-3 in every angle and origin).
"""
import argparse
import glob
import json
import os

import mrcfile
import numpy as np
import starfile

from mpi_em.evaluate import pose_errors
from mpi_em.fsc import fsc, resolution_at
from mpi_em.io import read_particles

ESTEP = ("read", "prepare", "coarse", "fine", "insert", "stats")


def known_resolution(d, box, apix):
    if os.path.exists(f"{d}/half1.mrc"):
        return resolution_at(fsc(mrcfile.read(f"{d}/half1.mrc"), mrcfile.read(f"{d}/half2.mrc")), box, apix, 0.143)
    return json.load(open(f"{d}/run.json"))["resolution_0143"]


def walls(T):
    """Wall-clock seconds of each iteration: from the previous iteration's end; the first, and the first of a
    continued run (--continue: its clock starts again), from its process's start (the start-up included)."""
    out, prev = [], None
    for r in T:
        t = r["seconds_since_start"]
        out.append(r["seconds_iteration"] if prev is None else (t - prev if t > prev else t))
        prev = t
    return out


def summary(name, run, truth, box, apix, known):
    T = json.load(open(f"{run}/run_timings.json"))
    fin = int(starfile.read(f"{run}/run_model.star")["model_general"]["rlnCurrentIteration"].iloc[0])
    h1, h2 = (mrcfile.read(f"{run}/run_half{k}_class001_unfil.mrc") for k in (1, 2))
    rr = resolution_at(fsc(h1, h2), box, apix, 0.143)
    mr = resolution_at(fsc(mrcfile.read(f"{run}/run_class001.mrc"), truth), box, apix, 0.5)
    a, s = pose_errors(f"{run}/run_data.star", PARTICLES)
    comp = sum(r["seconds_iteration"] for r in T)
    w = walls(T)
    wall = sum(w)
    last = min(11, len(T))
    w2 = sum(w[1:last])
    vs = " (%+.1f%% vs true poses)" % (100 * (rr / known - 1)) if known else ""
    print("%s: %d iterations (final files: iteration %d), %.1f s computation, %.1f s wall clock (iterations 2-%d: "
          "%.1f s computation, %.1f s wall clock); gold-standard %.2f A%s, map vs truth %.2f A, median error %.2f deg, "
          "median shift error %.2f px" % (name, len(T), fin, comp, wall, last,
                                           sum(r["seconds_iteration"] for r in T[1:last]), w2, rr, vs, mr,
                                           np.median(a), np.median(s) / apix))
    return T


def per_iteration(T, ceiling):
    print("it | s | wall s | E-step s (max rank) | coarse | fine | insert | stats | reduce | reconstruct | "
          "GEMM Tflop | E-step TFLOP/s (%% of %g) | coarse TFLOP/s | MB sent" % ceiling)
    tot = {"global": [0.0, 0.0], "local": [0.0, 0.0]}
    for r, wall in zip(T, walls(T)):
        ranks = r["per_rank"]
        sec = {k: max(p["seconds"].get(k, 0.0) for p in ranks) for k in ESTEP + ("reduce", "reconstruct")}
        fl = {k: ranks[0].get("flops", {}).get(k, 0.0) for k in ("coarse", "fine")}
        est = max(sum(p["seconds"].get(k, 0.0) for k in ESTEP) for p in ranks)
        f = (fl["coarse"] + fl["fine"]) * len(ranks)
        kind = "global" if fl["coarse"] > 1e12 else "local"
        tot[kind][0] += f
        tot[kind][1] += est
        sent = max(p.get("bytes", {}).get("reduce_sent", 0) for p in ranks) / 1e6
        print("%d | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.3f | %.3f | %.2f | %.1f (%.0f%%) | %.1f | %.0f" % (
            r["iteration"], r["seconds_iteration"], wall, est, sec["coarse"], sec["fine"], sec["insert"],
            sec["stats"], sec["reduce"], sec["reconstruct"], f / 1e12, f / est / 1e12, 100 * f / est / ceiling / 1e12,
            fl["coarse"] / max(sec["coarse"], 1e-9) / 1e12, sent))
    for kind, (f, e) in tot.items():
        if e:
            print("%s searches: %.2e flop in %.2f s of E-step = %.1f TFLOP/s (%.0f%% of %g)"
                  % (kind, f, e, f / e / 1e12, 100 * f / e / ceiling / 1e12, ceiling))
    detail = [r for r in T if r["per_rank"][0].get("detail_seconds")]
    if detail:
        print("MPI_EM_TIMING_DETAIL=1: steps inside the phases per iteration (s)")
        for r in detail:
            p = r["per_rank"][0]
            print(r["iteration"], {k: round(v, 3) for k, v in sorted(p["detail_seconds"].items())})


def same_poses(a, b):
    a, b = read_particles(f"{a}/run_data.star"), read_particles(f"{b}/run_data.star")
    pa = np.stack([a.rot, a.tilt, a.psi, a.origin_x, a.origin_y], 1)
    pb = np.stack([b.rot, b.tilt, b.psi, b.origin_x, b.origin_y], 1)
    return np.all(np.abs(pa - pb) < 1e-3, axis=1).mean()


def main():
    global PARTICLES
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data")
    p.add_argument("runs", nargs="+", help="NAME=RUN_DIR")
    p.add_argument("--known")
    p.add_argument("--ceiling", type=float, default=55.0, help="GEMM ceiling, TFLOP/s (CGEMM, real-equivalent)")
    p.add_argument("--particles", help="the true poses (default: DATA_DIR/particles.star)")
    p.add_argument("--compare", action="store_true")
    p.add_argument("--per-iteration", action="store_true")
    a = p.parse_args()
    PARTICLES = a.particles or os.path.join(a.data, "particles.star")
    m = mrcfile.open(os.path.join(a.data, "truth.mrc"))
    truth, box, apix = m.data.astype(np.float64), m.data.shape[0], float(m.voxel_size.x)
    known = None
    if a.known:
        known = known_resolution(a.known, box, apix)
        mk = resolution_at(fsc(mrcfile.read(f"{a.known}/map.mrc"), truth), box, apix, 0.5)
        print("true poses (mpi-em reconstruct): gold-standard %.2f A, map vs truth %.2f A" % (known, mk))
    runs = [r.split("=", 1) if "=" in r else (os.path.basename(r.rstrip("/")), r) for r in a.runs]
    for name, d in runs:
        T = summary(name, d, truth, box, apix, known)
        for f in sorted(glob.glob(f"{d}/run_it*_data.star")) if a.per_iteration else []:
            e, _ = pose_errors(f, PARTICLES)
            print("   %s: median angular error %.2f deg" % (os.path.basename(f), np.median(e)))
        per_iteration(T, a.ceiling)
    if a.compare:
        for name, d in runs[1:]:
            print("%s vs %s: identical poses (1e-3) for %.4f of the particles"
                  % (runs[0][0], name, same_poses(runs[0][1], d)))


if __name__ == "__main__":
    main()
