"""The CPU work at the start of an EM job, part by part: reading a data set's particle images in the jobs' batches
(:func:`mpi_em.particles.iter_batches`, from the page cache: the file is read once first) and low-passing the start
map to --ini-high (:func:`mpi_em.em.model.lowpass`, rank 0, before the first iteration: once per job, so the first
call of a fresh process counts, FFT plans and the first touch of its memory included; a repeated call beside it).
On a GPU rank these use its host's cores before the device has work, so they add to every job's wall clock.

    python benchmarks/job_start.py --star DATA/particles.star --box 256 360 --repeats 3 --json OUT.json

Prints one table (median seconds and GB/s of each part) and writes JSON. Compare trees by running the same script
against each (``git archive REV``; the script imports the ``mpi_em`` beside it).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mpi_em.em.model import lowpass  # noqa: E402
from mpi_em.io import read_particles  # noqa: E402
from mpi_em.particles import iter_batches  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--star", required=True, help="particles STAR file (its stacks are read)")
    ap.add_argument("--batch", type=int, default=256, help="images per batch (a GPU rank's default at box 256)")
    ap.add_argument("--box", type=int, nargs="+", default=[256, 360], help="start-map boxes to low-pass")
    ap.add_argument("--apix", type=float, default=1.5)
    ap.add_argument("--ini-high", type=float, default=30.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    star = read_particles(a.star)
    plan = {"stack": np.asarray(star.stack), "index": np.asarray(star.index)}
    rows = []
    for rep in range(a.repeats + 1):  # the first pass fills the page cache: not counted
        t, nbytes = time.perf_counter(), 0
        for _, imgs in iter_batches(plan, a.batch):
            nbytes += imgs.nbytes
        if rep:
            rows.append({"part": f"read {len(plan['index'])} images", "seconds": time.perf_counter() - t,
                         "bytes": nbytes})
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    for box in a.box:
        v = np.random.default_rng(box).standard_normal((box,) * 3).astype(np.float32)
        for _ in range(a.repeats):  # a job low-passes once: the first call of a fresh process (plans, first touch)
            code = (f"import sys, time, numpy as np; sys.path.insert(0, {root!r}); "
                    "from mpi_em.em.model import lowpass; "
                    f"v = np.random.default_rng({box}).standard_normal(({box},) * 3).astype(np.float32); "
                    f"t = time.perf_counter(); lowpass(v, {box}, {a.apix}, {a.ini_high}); "
                    "print(time.perf_counter() - t)")
            sec = float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                       text=True).stdout.split()[-1])
            rows.append({"part": f"lowpass box {box}, first call", "seconds": sec, "bytes": v.nbytes})
        lowpass(v, box, a.apix, a.ini_high)  # FFT plans made, memory touched
        for _ in range(a.repeats):
            t = time.perf_counter()
            lowpass(v, box, a.apix, a.ini_high)
            rows.append({"part": f"lowpass box {box}, again", "seconds": time.perf_counter() - t,
                         "bytes": v.nbytes})
    print(f"{'part':36s} {'seconds':>8s} {'GB/s':>6s}   (median of {a.repeats})")
    for p in dict.fromkeys(r["part"] for r in rows):
        s = float(np.median([r["seconds"] for r in rows if r["part"] == p]))
        b = next(r["bytes"] for r in rows if r["part"] == p)
        print(f"{p:36s} {s:8.3f} {b / s / 1e9:6.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "host": platform.node(), "cpu": platform.processor(), "cores": os.cpu_count(),
                       "date": time.strftime("%Y-%m-%d"), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
